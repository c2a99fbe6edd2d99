"""Keyword spotting on a continuous stream: trained on whole clips, run frame by frame.

The data is generated with a fixed seed and stands in for 40-band log-mel
frames at 100 frames/s: each of 6 keywords is a sequence of 3-4 "syllables",
each a pair of formant bumps (Gaussian in frequency) with its own pitch and
duration, placed at a random time in a 1-s clip (100 frames) of coloured
noise; a seventh class is noise only. Speakers vary the tempo (x0.8 to x1.25)
and shift the formants.

The model is causal: 5 `tsc.streaming.StreamingConv1D` layers (kernel 3,
dilations 1, 2, 4, 8, 16, the third with stride 2, ReLU), k-winners-take-all
over channels after the second (`tsc.layers.KWinners`), a channel-sparse 1x1
mixing layer (`tsc.layers.ChannelSparseConv1D`, fan-in 1/4) and per-frame
logits (Dense). It emits logits every 2 frames; training uses the logits at
the end of each clip (receptive field 125 frames: the whole clip).

Then:
1. the test clips are concatenated into one long stream;
2. `tsc.streaming.to_streaming(model)` runs it frame by frame; its outputs are
   compared with the full-sequence model run over the whole stream (they must
   be equal up to float rounding), and the keyword decided at each clip's end
   is scored;
3. the per-frame latency of `step` is measured against recomputing the last
   128 frames with the full model (what a non-streaming detector does);
4. the step function is exported with `tsc.streaming.export_streaming`
   (external state) and reloaded, and a few frames are served from it;
5. the step is exported as a LiteRT model (`tsc.export.export_litert` of the
   streaming model) and the stream's first frames run through LiteRT's
   interpreter one at a time, the returned state fed back, compared with the
   full-sequence model.

    .venv/bin/python examples/keyword_spotting_streaming.py [--quick]

Run time on 2 CPU cores: about 1 minute (--quick: about 20 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

import tf_sparseconv as tsc

try:  # LiteRT's interpreter (TensorFlow's tf.lite.Interpreter is deprecated)
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # pragma: no cover
    from tensorflow.lite import Interpreter

BANDS = 40
CLIP = 100
KEYWORDS = ("yes", "no", "up", "down", "stop", "go")
CLASSES = (*KEYWORDS, "_noise_")
WINDOW = 128


def make_templates(rng):
    """Per keyword: a list of syllables (duration, formant 1 band, formant 2 band)."""
    return [
        [
            (int(rng.integers(6, 14)), rng.uniform(4, 18), rng.uniform(18, 36))
            for _ in range(int(rng.integers(3, 5)))
        ]
        for _ in KEYWORDS
    ]


def render(rng, template, length: int = CLIP):
    """One clip [length, BANDS]: noise, plus the keyword's syllables at a random start."""
    bands = np.arange(BANDS)[None, :]
    tilt = np.linspace(0.5, 0.0, BANDS)[None, :]
    clip = 0.4 * rng.standard_normal((length, BANDS)) + tilt
    if template is None:
        return clip.astype(np.float32)
    tempo = rng.uniform(0.8, 1.25)
    shift = rng.uniform(-1.5, 1.5)
    syllables = [(max(3, int(d * tempo)), f1 + shift, f2 + shift) for d, f1, f2 in template]
    total = sum(d for d, _, _ in syllables) + 2 * (len(syllables) - 1)
    t = int(rng.integers(0, max(1, length - total)))
    for duration, f1, f2 in syllables:
        envelope = np.sin(np.linspace(0, np.pi, duration))[:, None]
        glide = np.linspace(-1, 1, duration)[:, None] * rng.uniform(-1, 1)
        shape = np.exp(-0.5 * ((bands - f1 - glide) / 1.5) ** 2) + 0.7 * np.exp(
            -0.5 * ((bands - f2 + glide) / 2.0) ** 2
        )
        end = min(length, t + duration)
        clip[t:end] += 1.5 * (envelope * shape)[: end - t]
        t = end + 2
        if t >= length:
            break
    return clip.astype(np.float32)


def make_data(seed: int, count: int):
    rng = np.random.default_rng(seed)
    templates = make_templates(np.random.default_rng(1234))  # the same keywords in every split
    labels = rng.integers(0, len(CLASSES), count)
    clips = np.stack([render(rng, templates[y] if y < len(KEYWORDS) else None) for y in labels])
    return clips, labels


def build_model(width: int) -> keras.Model:
    """Per-frame logits [B, ceil(T / 2), classes] from frames [B, T, BANDS]; causal."""
    conv = tsc.streaming.StreamingConv1D
    frames = keras.Input((None, BANDS), name="frames")
    h = conv(width, 3, dilation_rate=1, activation="relu", name="conv1")(frames)
    h = conv(width, 3, dilation_rate=2, activation="relu", name="conv2")(h)
    h = tsc.layers.KWinners(sparsity=0.75, name="kwta")(h)
    h = conv(width, 3, strides=2, dilation_rate=4, activation="relu", name="conv3_stride2")(h)
    h = conv(width, 3, dilation_rate=8, activation="relu", name="conv4")(h)
    h = conv(width, 3, dilation_rate=16, activation="relu", name="conv5")(h)
    h = tsc.layers.ChannelSparseConv1D(width, 1, density=0.25, activation="relu", name="mix")(h)
    logits = keras.layers.Dense(len(CLASSES), name="logits")(h)
    return keras.Model(frames, logits, name="kws_per_frame")


def receptive_field(model) -> int:
    """Input frames the last output depends on (through the strided layer)."""
    field, jump = 1, 1
    for layer in model.layers:
        if isinstance(layer, tsc.streaming.StreamingConv1D):
            field += (layer.span - 1) * jump
            jump *= layer.strides
    return field


def train(model, clips, labels, epochs: int):
    last = keras.layers.Lambda(lambda y: y[:, -1], name="clip_end")(model.output)
    trainer = keras.Model(model.input, last)
    trainer.compile(
        keras.optimizers.Adam(2e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    trainer.fit(clips, labels, batch_size=64, epochs=epochs, verbose=0)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer epochs (smoke test)")
    parser.add_argument(
        "--litert-frames", type=int, default=1000, help="frames streamed through the LiteRT step"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    n_train, n_test, epochs, width = (600, 60, 3, 32) if args.quick else (3000, 300, 12, 64)
    x_train, y_train = make_data(1, n_train)
    x_test, y_test = make_data(2, n_test)
    model = build_model(width)
    trainer = train(model, x_train, y_train, epochs)
    clip_accuracy = float(np.mean(np.argmax(trainer.predict(x_test, verbose=0), -1) == y_test))
    print(
        f"trained on {n_train} clips ({epochs} epochs, width {width}); receptive field "
        f"{receptive_field(model)} frames; test accuracy on isolated clips: {clip_accuracy:.4f}"
    )

    # 1-2. One continuous stream of the test clips, frame by frame.
    stream = x_test.reshape(1, -1, BANDS)
    full = model(stream).numpy()
    streaming = tsc.streaming.to_streaming(model)
    outputs, step_times = [], []
    for t in range(stream.shape[1]):
        frame = tf.constant(stream[:, t : t + 1])
        begin = time.perf_counter()
        out = streaming.step(frame).numpy()
        step_times.append(time.perf_counter() - begin)
        outputs.append(out)
    streamed = np.concatenate(outputs, axis=1)
    max_diff = float(np.abs(streamed - full).max())
    per_clip = CLIP // 2  # logits every 2 frames
    decisions = np.argmax(streamed[0, per_clip - 1 :: per_clip], -1)
    stream_accuracy = float(np.mean(decisions == y_test))
    print(
        f"streamed {stream.shape[1]} frames one at a time: {streamed.shape[1]} logit frames (stride 2), "
        f"max |streaming - full sequence| = {max_diff:.2e}; keyword at each clip end: accuracy "
        f"{stream_accuracy:.4f} (the receptive field reaches into the previous clip)"
    )

    # 3. Latency per frame: step vs recomputing the last WINDOW frames.
    recompute = tf.function(lambda v: model(v)[:, -1:], autograph=False)
    window = tf.constant(stream[:, :WINDOW])
    recompute(window)
    recompute_times = []
    for _ in range(50):
        begin = time.perf_counter()
        recompute(window).numpy()
        recompute_times.append(time.perf_counter() - begin)
    step_ms = statistics.median(step_times[WINDOW:]) * 1e3
    p90 = float(np.percentile(step_times[WINDOW:], 90)) * 1e3
    recompute_ms = statistics.median(recompute_times) * 1e3
    print(
        f"latency per frame: streaming step {step_ms:.3f} ms (p90 {p90:.3f} ms), recompute of the last "
        f"{WINDOW} frames {recompute_ms:.3f} ms: {recompute_ms / step_ms:.1f}x"
    )

    # 4. The step function as a SavedModel with external state.
    with tempfile.TemporaryDirectory() as tmp:
        path = tsc.streaming.export_streaming(model, os.path.join(tmp, "kws_step"))
        served = tf.saved_model.load(path)
        state = served.signatures["initial_state"](batch_size=tf.constant(1))
        chunks = []
        for t0 in range(0, 40, 8):
            result = served.signatures["step"](frames=tf.constant(stream[:, t0 : t0 + 8]), **state)
            chunks.append(result.pop("outputs").numpy())
            state = {name.replace("next_", ""): value for name, value in result.items()}
        served_diff = float(np.abs(np.concatenate(chunks, axis=1) - full[:, :20]).max())
    print(
        "exported step (external state) reloaded: first 40 frames served, "
        f"max |served - full| = {served_diff:.2e}"
    )

    # 5. On device: the step as a LiteRT model, one frame per call, the state fed back.
    with tempfile.TemporaryDirectory() as tmp:
        path = tsc.export.export_litert(streaming, os.path.join(tmp, "kws_step.tflite"))
        size_kib = os.path.getsize(path) / 1024
        runner = Interpreter(model_path=path).get_signature_runner("step")
        state = {f"state_{i}": np.asarray(s) for i, s in enumerate(streaming.initial_state(1))}
        frames = args.litert_frames
        chunks, litert_times = [], []
        for t in range(frames):
            begin = time.perf_counter()
            result = runner(frames=stream[:, t : t + 1], **state)
            litert_times.append(time.perf_counter() - begin)
            chunks.append(result.pop("outputs"))
            state = {name.replace("next_", ""): value for name, value in result.items()}
        on_device = np.concatenate(chunks, axis=1)
        reference = full[:, : on_device.shape[1]]
        relative = float(np.abs(on_device - reference).max() / np.abs(reference).max())
    litert_ms = statistics.median(litert_times) * 1e3
    print(
        f"LiteRT step ({size_kib:.1f} KiB .tflite, external state): {frames} frames one at a time, "
        f"max |LiteRT - full| / max |full| = {relative:.2e}; {litert_ms:.3f} ms per frame "
        f"(streaming step in TensorFlow: {step_ms:.3f} ms)"
    )
    print(f"total wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
