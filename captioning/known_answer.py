"""A known-answer test that ties a bundle's encoder and decoder to each other.

The manifest's checksums say that each file is the one it names, not that the files belong
together: an encoder and a decoder of the same architecture from two training runs (a file copied
from another version, then the manifest rewritten by a tool) load, warm up and caption, and every
caption is nonsense. So when a bundle is written, the model reads a fixed probe image and a fixed
token sequence in one teacher-forced call, and the manifest records (`KEY`) the word it likes best
at each position and that word's log-probability; on loading, the loaded encoder (as it will serve)
and decoder score the same words at the same positions, and each must come within `TOLERANCE` of
the recorded log-probability. One call each way, so it costs a load about 0.1 s.

Measured on the committed models: serving the encoder in bfloat16 moved a log-probability by at
most 0.02 nats; a decoder from another version or run, under a rewritten manifest, by 1.7-6.4.
"""

from __future__ import annotations

import numpy as np

from captioning.tokenizer import START_ID, UNK_ID

KEY = "known_answer"
TOLERANCE = 0.25  # nats, per token


class KnownAnswerMismatch(ValueError):
    pass


def probe_image(size: int) -> np.ndarray:
    """A fixed uint8 [size, size, 3] picture (red and green ramps, a blue checkerboard), made
    with integer arithmetic only, so every platform draws the same pixels."""
    y, x = np.mgrid[0:size, 0:size]
    red = (x * 255) // (size - 1)
    green = (y * 255) // (size - 1)
    blue = ((x * 8 // size + y * 8 // size) % 2) * 200 + 30
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def _features(encoder, size: int) -> np.ndarray:
    import tensorflow as tf

    return tf.cast(encoder(probe_image(size)[None].astype(np.float32), training=False), tf.float32).numpy()


def _log_probs(decoder, features, ids: list[int]) -> np.ndarray:
    """Teacher-forced log-probabilities [len(ids) + 1, vocab] after <start> and each of `ids`."""
    import tensorflow as tf

    tokens = np.array([[START_ID, *ids]], dtype=np.int32)
    return tf.nn.log_softmax(decoder([tokens, features], training=False)[0]).numpy()


def probe_tokens(max_length: int, vocab_size: int) -> list[int]:
    """The fixed input sequence (after <start>): the vocabulary's words in turn."""
    words = list(range(UNK_ID + 3, vocab_size)) or [UNK_ID]  # after <pad>, <unk>, <start>, <end>
    return [words[i % len(words)] for i in range(max_length - 2)]


def compute(encoder, decoder, image_size: int, max_length: int, vocab_size: int) -> dict:
    """The known answer: at each position of the probe's teacher-forced call, the best-liked word
    and its log-probability."""
    tokens = probe_tokens(max_length, vocab_size)
    rows = _log_probs(decoder, _features(encoder, image_size), tokens)
    if not np.all(np.isfinite(rows)):
        raise ValueError("the model's log-probabilities on the probe are not finite: its weights hold NaN or inf")
    targets = [int(word) for word in rows.argmax(axis=-1)]
    return {
        "tokens": tokens,
        "targets": targets,
        "log_probs": [round(float(rows[t, word]), 6) for t, word in enumerate(targets)],
    }


def check(encoder, decoder, image_size: int, answer: dict) -> None:
    """KnownAnswerMismatch unless the models score the recorded answer within TOLERANCE."""
    import tensorflow as tf

    try:
        tokens = [int(token) for token in answer["tokens"]]
        targets = [int(word) for word in answer["targets"]]
        recorded = np.asarray(answer["log_probs"], dtype=np.float64)
        rows = _log_probs(decoder, _features(encoder, image_size), tokens)
        got = rows[np.arange(len(targets)), targets]
        distances = np.abs(got - recorded)  # inside: targets and log_probs of different lengths
    except (ValueError, IndexError, KeyError, TypeError, tf.errors.InvalidArgumentError) as exc:
        # a malformed record, another feature grid, or ids beyond this decoder's vocabulary
        raise KnownAnswerMismatch(f"the models cannot score the recorded answer ({exc})") from None
    if not np.all(np.isfinite(got)):
        raise KnownAnswerMismatch("on the probe the models' log-probabilities are not finite: NaN or inf weights")
    worst = float(np.max(distances, initial=0.0))
    if not worst <= TOLERANCE:  # also when the record itself holds NaN
        raise KnownAnswerMismatch(
            f"on the probe the models score the recorded words {worst:.2f} nats away from the manifest's "
            f"known answer (at most {TOLERANCE} allowed)"
        )
