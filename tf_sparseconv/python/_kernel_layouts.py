"""Where the channels are in each kind of layer kernel: the one table `tsc.pruning` (which
axis holds the input channels) and `tsc.quantization` (which axes are output channels, for
per-channel scales) both read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelLayout:
    """The axes of a kernel (negative, counted from the end)."""

    name: str
    in_axis: int  # the input channels
    out_axes: tuple[int, ...]  # the output channels (each entry of them is one channel)


STANDARD = KernelLayout("[*k, in, out]", in_axis=-2, out_axes=(-1,))
TRANSPOSED = KernelLayout("[*k, out, in]", in_axis=-1, out_axes=(-2,))
# Every (in, multiplier) pair is an output channel of a depthwise convolution.
DEPTHWISE = KernelLayout("[*k, in, multiplier]", in_axis=-2, out_axes=(-2, -1))


def _table() -> tuple[tuple[tuple[type, ...], KernelLayout], ...]:
    from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose
    from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv

    from tf_sparseconv.python.layers.coord_sparse import SparseConvTranspose

    return (
        ((BaseDepthwiseConv,), DEPTHWISE),
        ((BaseConvTranspose, SparseConvTranspose), TRANSPOSED),
    )


def kernel_layout(layer, attr: str = "kernel") -> KernelLayout:
    """The layout of `layer.<attr>` (Dense, Conv*, DepthwiseConv*, SeparableConv*,
    Conv*Transpose and the `tsc.layers` convolutions; any other kernel is `[*k, in, out]`)."""
    if attr == "depthwise_kernel":
        return DEPTHWISE
    for types, layout in _table():
        if isinstance(layer, types):
            return layout
    return STANDARD
