"""Argument checks shared by every family: ops, layers, pruning, quantization, streaming.

One rule everywhere: an integer argument accepts Python and NumPy integers, and rejects bools,
floats (`2.5`, and `2.0` too), strings and None (unless the argument allows None), with a
`ValueError` that names the argument. Depends only on NumPy,
so any module of the package can import it.
"""

from __future__ import annotations

import numbers

import numpy as np

INT32_MAX = int(np.iinfo(np.int32).max)
INT32_MIN = int(np.iinfo(np.int32).min)


def is_int(value) -> bool:
    """A Python or NumPy integer (also a 0-d integer array, as `np.ceil(x).astype(np.int32)`
    gives), not a bool and not a float (not even `2.0`)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def as_int(value) -> int | None:
    """`value` as a Python int when it is an integer (`is_int`), else None."""
    return int(value) if is_int(value) else None


def _bounds(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return f" <= {maximum}" if maximum is not None else ""


def integer(value, name: str, minimum: int | None = None, maximum: int | None = None, allow_none=False):
    """`value` as a Python int in `[minimum, maximum]` (either bound optional); None passes
    when `allow_none`."""
    if value is None and allow_none:
        return None
    result = as_int(value)
    low = -np.inf if minimum is None else minimum
    high = np.inf if maximum is None else maximum
    if result is None or not low <= result <= high:
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be an integer{_bounds(minimum, maximum)}{extra}, got {value!r}")
    return result


def positive_int(value, name: str, allow_none: bool = False):
    """`value` as an int >= 1 (None passes when `allow_none`)."""
    return integer(value, name, minimum=1, allow_none=allow_none)


def int_tuple(value, rank: int, name: str, minimum: int | None = 1) -> tuple[int, ...]:
    """An integer, or `rank` of them, as a tuple of Python ints (sizes, strides, dilations,
    offsets). Every entry must fit in int32 (op attributes are int32) and be `>= minimum` (no
    lower bound when `minimum` is None)."""
    if as_int(value) is not None:
        value = (value,) * rank
    try:
        entries = tuple(value)
    except TypeError:
        raise ValueError(f"`{name}` must be an integer or {rank} integers, got {value!r}") from None
    ints = tuple(as_int(v) for v in entries)
    if len(ints) != rank or None in ints:
        raise ValueError(f"`{name}` must be an integer or {rank} integers, got {value!r}")
    low = INT32_MIN if minimum is None else minimum
    if ints and (min(ints) < low or max(ints) > INT32_MAX):
        bound = f">= {minimum}" if minimum is not None else "in int32 range"
        raise ValueError(f"`{name}` entries must be {bound}, got {value!r}")
    return ints


def choice(value, name: str, options: tuple) -> object:
    """`value`, which must be one of `options`."""
    if value not in options:
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}")
    return value


def padding(value, name: str = "padding", upper: bool = False) -> str:
    """'same' or 'valid' in any case, returned lower case ('SAME'/'VALID' when `upper`)."""
    if not isinstance(value, str) or value.lower() not in ("same", "valid"):
        options = "'SAME' or 'VALID'" if upper else "'same' or 'valid'"
        raise ValueError(f"`{name}` must be {options}, got {value!r}")
    return value.upper() if upper else value.lower()


def fraction(value, name: str, *, allow_zero: bool, allow_one: bool, allow_none: bool = False):
    """A number in (0, 1), with 0 and/or 1 allowed, as a float (None passes when `allow_none`)."""
    if value is None and allow_none:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number, got {value!r}") from None
    lo_ok = value >= 0 if allow_zero else value > 0
    hi_ok = value <= 1 if allow_one else value < 1
    if not (lo_ok and hi_ok):
        lo = "[0" if allow_zero else "(0"
        hi = "1]" if allow_one else "1)"
        raise ValueError(f"`{name}` must be in {lo}, {hi}, got {value}")
    return value


def exactly_one(**kwargs) -> None:
    """Exactly one of the keyword arguments is not None."""
    given = [k for k, v in kwargs.items() if v is not None]
    if len(given) != 1:
        names = " or ".join(f"`{k}`" for k in kwargs)
        raise ValueError(f"Pass exactly one of {names}; got {given or 'none'}")


def connection_lists(
    values, rows: int | None = None, in_channels: int | None = None, where: str = "", name="connections"
) -> np.ndarray:
    """Constant channel-sparse connection lists as int32 `[rows, m]`: integers, one row per
    output channel, every value in `[0, in_channels)` and no channel twice in a row (the
    bounds and counts that are None are not checked)."""
    prefix = f"{where}: " if where else ""
    array = np.asarray(values)
    if (
        array.ndim != 2
        or (rows is not None and array.shape[0] != rows)
        or not np.issubdtype(array.dtype, np.integer)
    ):
        layout = f"[filters={rows}, m]" if rows is not None else "[Cout, m]"
        raise ValueError(
            f"{prefix}`{name}` must be an int array of shape {layout}, got shape {array.shape} "
            f"and dtype {array.dtype}"
        )
    if array.size:
        high = np.inf if in_channels is None else in_channels
        bad = array[(array < 0) | (array >= high)]
        if bad.size:
            upper = in_channels if in_channels is not None else "Cin"
            raise ValueError(f"{prefix}`{name}` values must be in [0, {upper}), got {int(bad.flat[0])}")
        ordered = np.sort(array, axis=1)
        repeated = np.nonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))[0]
        if len(repeated):
            row = int(repeated[0])
            raise ValueError(
                f"{prefix}`{name}` row {row} lists an input channel twice: {array[row].tolist()}"
            )
    return array.astype(np.int32)
