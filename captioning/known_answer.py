"""A known-answer test that ties a bundle's encoder and decoder to each other.

The manifest's checksums say that each file is the one it names, not that the files belong
together: an encoder and a decoder of the same architecture from two training runs (a file copied
from another version, then the manifest rewritten by a tool) load, warm up and caption, and every
caption is nonsense. So when a bundle is written, the model captions a fixed probe image greedily
and the manifest records the caption's token ids and each token's log-probability
(`KEY`); on loading, the same tokens are scored on the probe by the loaded models, teacher-forced,
and every log-probability must come within `TOLERANCE` of the recorded one.

Measured on the committed models: serving the encoder in bfloat16 moves a token's log-probability
by at most 0.03 nats; a decoder trained on another run's features moved one by 12 nats.
"""

from __future__ import annotations

import numpy as np

from captioning.tokenizer import END_ID, START_ID

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


def compute(encoder, decoder, image_size: int, max_length: int) -> dict:
    """The probe's greedy caption (token ids, <end> excluded) and each token's log-probability,
    <end>'s last when the caption ends within `max_length` tokens."""
    features = _features(encoder, image_size)
    ids: list[int] = []
    while True:
        step = _log_probs(decoder, features, ids)[-1]
        token = int(np.argmax(step))
        if token == END_ID or len(ids) == max_length - 2:
            break
        ids.append(token)
    scored = ids + [END_ID] if token == END_ID else ids
    rows = _log_probs(decoder, features, ids)
    return {"tokens": ids, "log_probs": [round(float(rows[t, k]), 6) for t, k in enumerate(scored)]}


def check(encoder, decoder, image_size: int, answer: dict) -> None:
    """KnownAnswerMismatch unless the models score the recorded answer within TOLERANCE."""
    ids = [int(token) for token in answer["tokens"]]
    recorded = np.asarray(answer["log_probs"], dtype=np.float64)
    scored = ids + [END_ID] if len(recorded) == len(ids) + 1 else ids
    try:
        rows = _log_probs(decoder, _features(encoder, image_size), ids)
    except ValueError as exc:  # Keras: the decoder was built for another feature grid
        raise KnownAnswerMismatch(f"the decoder does not take this encoder's features ({exc})") from None
    got = np.array([rows[t, k] for t, k in enumerate(scored)])
    worst = float(np.max(np.abs(got - recorded))) if len(got) else 0.0
    if worst > TOLERANCE:
        raise KnownAnswerMismatch(
            f"on the probe image the models score the recorded caption {worst:.2f} nats away from the manifest's "
            f"known answer (at most {TOLERANCE} allowed)"
        )
