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

A bundle with a scene head (captioning.grounding) records the head's answer too (`SCENE_HEAD`):
its two likeliest labels at each cell of the probe and their log-probabilities, from the same
features. The runner-up is recorded because a head is often sure a cell is background, and
another head would be as sure. Measured on default/5 (round 34): bfloat16 serving moved them by
at most 0.13 nats, the head of another training run of the same recipe by 1.4-3.8, of another
seed by 20-23; hence its own tolerance.
"""

from __future__ import annotations

import numpy as np

from captioning.tokenizer import START_ID, UNK_ID

KEY = "known_answer"
TOLERANCE = 0.25  # nats, per token
SCENE_HEAD = "scene_head"  # the head's part of the answer
SCENE_HEAD_TOLERANCE = 0.5  # nats, per cell and label


class KnownAnswerMismatch(ValueError):
    pass


class UnrecordedSceneHead(KnownAnswerMismatch):
    """The bundle has a scene head and the answer no part for it (bundles saved in round 33)."""


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


def _cell_log_probs(features: np.ndarray, scene_head) -> np.ndarray:
    """The head's log-probabilities [cells, classes] on the probe's features [1, cells, D]."""
    logits = features[0].astype(np.float64) @ scene_head.weights + scene_head.bias
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def compute(encoder, decoder, image_size: int, max_length: int, vocab_size: int, scene_head=None) -> dict:
    """The known answer: at each position of the probe's teacher-forced call, the best-liked word
    and its log-probability; with a scene head (captioning.grounding.SceneHead), its answer too."""
    tokens = probe_tokens(max_length, vocab_size)
    features = _features(encoder, image_size)
    rows = _log_probs(decoder, features, tokens)
    if not np.all(np.isfinite(rows)):
        raise ValueError("the model's log-probabilities on the probe are not finite: its weights hold NaN or inf")
    targets = [int(word) for word in rows.argmax(axis=-1)]
    answer = {
        "tokens": tokens,
        "targets": targets,
        "log_probs": [round(float(rows[t, word]), 6) for t, word in enumerate(targets)],
    }
    if scene_head is not None:
        answer[SCENE_HEAD] = _scene_head_part(features, scene_head)
    return answer


def _scene_head_part(features: np.ndarray, scene_head) -> dict:
    """The head's part: its two likeliest labels at each cell and their log-probabilities."""
    cells = _cell_log_probs(features, scene_head)
    if not np.all(np.isfinite(cells)):
        raise ValueError("the scene head's log-probabilities on the probe are not finite: its weights hold NaN or inf")
    labels = np.argsort(-cells, axis=-1, kind="stable")[:, :2]
    chosen = np.take_along_axis(cells, labels, axis=-1)
    return {"labels": labels.tolist(), "log_probs": np.round(chosen, 6).tolist()}


def scene_head_answer(encoder, image_size: int, scene_head) -> dict:
    """The head's part of the answer alone, for a head joining a bundle whose models are checked."""
    return _scene_head_part(_features(encoder, image_size), scene_head)


def check(encoder, decoder, image_size: int, answer: dict, scene_head=None) -> None:
    """KnownAnswerMismatch unless the models score the recorded answer within TOLERANCE, and a
    scene head (when given) its part within SCENE_HEAD_TOLERANCE."""
    import tensorflow as tf

    try:
        tokens = [int(token) for token in answer["tokens"]]
        targets = [int(word) for word in answer["targets"]]
        recorded = np.asarray(answer["log_probs"], dtype=np.float64)
        features = _features(encoder, image_size)
        if not len(targets) == len(tokens) + 1 == len(recorded):  # a position after <start> and each token
            raise ValueError(f"{len(tokens)} tokens, {len(targets)} targets, {len(recorded)} log-probabilities")
        rows = _log_probs(decoder, features, tokens)
        got = rows[np.arange(len(targets)), targets]
        distances = np.abs(got - recorded)
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
    if scene_head is not None:
        _check_scene_head(features, scene_head, answer)


def _check_scene_head(features: np.ndarray, scene_head, answer: dict) -> None:
    if SCENE_HEAD not in answer:
        raise UnrecordedSceneHead(
            "the manifest's known answer has no part for the scene head, so nothing ties the head to this "
            "encoder; for a bundle saved before heads had one, captioning.artifacts.record_known_answer(bundle) "
            "records it"
        )
    try:
        labels = np.asarray(answer[SCENE_HEAD]["labels"], dtype=np.int64)
        recorded = np.asarray(answer[SCENE_HEAD]["log_probs"], dtype=np.float64)
        cells = _cell_log_probs(features, scene_head)
        if not labels.shape == recorded.shape == (len(cells), 2):
            raise ValueError(f"labels {labels.shape} and log-probabilities {recorded.shape} for {len(cells)} cells")
        got = np.take_along_axis(cells, labels, axis=-1)
        distances = np.abs(got - recorded)
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise KnownAnswerMismatch(f"the scene head cannot score its recorded answer ({exc})") from None
    worst = float(np.max(distances, initial=0.0))
    if not worst <= SCENE_HEAD_TOLERANCE:
        raise KnownAnswerMismatch(
            f"on the probe the scene head scores its recorded labels {worst:.2f} nats away from the manifest's "
            f"known answer (at most {SCENE_HEAD_TOLERANCE} allowed)"
        )
