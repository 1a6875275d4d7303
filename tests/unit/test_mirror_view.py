"""The mirror view (captioning.mirror): an image decoded with its left-right mirror, offline and in
the engine, with every strategy."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from app.engine.scheduler import AdmissionQueue
from captioning.decoding import DecodeOptions
from captioning.mirror import mirror_permutation
from captioning.tokenizer import END_ID, START_ID, Tokenizer

SIDE_CAPTIONS = ["a red circle to the left of a blue square", "a blue square to the right of a red circle"]


@pytest.fixture(scope="module")
def sided(tmp_path_factory):
    """A tiny random model whose vocabulary has "left" and "right", the two made likely, so that
    its captions name sides and the mirror has words to swap."""
    from captioning.captioner import Captioner
    from tests.conftest import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path_factory.mktemp("sided") / "tiny", captions=SIDE_CAPTIONS, seed=3)
    captioner = Captioner.load(bundle)
    logits = captioner.decoder.get_layer("logits")
    kernel, bias = logits.get_weights()
    bias[[captioner.tokenizer.ids["left"], captioner.tokenizer.ids["right"]]] += 2.0
    logits.set_weights([kernel, bias])
    return captioner


def pictures(count: int, seed: int = 5, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def tokens_of(captioner, images, options) -> list[list[str]]:
    return [[c.tokens for c in best] for best in captioner.caption(list(images), options)]


def test_the_mirror_swaps_left_and_right_and_nothing_else():
    tokenizer = Tokenizer.build(SIDE_CAPTIONS)
    permutation = mirror_permutation(tokenizer)
    left, right = tokenizer.ids["left"], tokenizer.ids["right"]
    assert permutation[left] == right and permutation[right] == left
    unchanged = np.delete(np.arange(len(tokenizer)), [left, right])
    np.testing.assert_array_equal(permutation[unchanged], unchanged)
    with pytest.raises(ValueError, match="only one of 'left' and 'right'"):
        mirror_permutation(Tokenizer.build(["a circle to the left of a square"]))


def reference_greedy(captioner, images: np.ndarray) -> list[list[str]]:
    """The mirror view written out plainly: both views' log-probabilities averaged (the mirror's
    words swapped), the argmax fed to both views, <end> barred before the first word."""
    permutation = captioner.mirror_permutation
    count = len(images)
    features = captioner.encode(np.concatenate([images, images[:, :, ::-1]]))
    step = captioner.feature_slots(2 * count)
    step.encode(np.concatenate([images, images[:, :, ::-1]]), np.arange(2 * count))
    assert features.shape[0] == 2 * count
    tokens = np.full(2 * count, START_ID, np.int32)
    state = np.zeros((2 * count, captioner.state_size), np.float32)
    words: list[list[int]] = [[] for _ in range(count)]
    done = np.zeros(count, bool)
    for _ in range(captioner.max_steps(DecodeOptions())):
        log_probs, state, _ = step.step(np.arange(2 * count), tokens, state)
        scores = (log_probs[:count] + log_probs[count:][:, permutation]) / 2
        scores[[not w for w in words], END_ID] = -np.inf
        chosen = scores.argmax(axis=1)
        for i, token in enumerate(chosen):
            if not done[i]:
                done[i] = token == END_ID
                if not done[i]:
                    words[i].append(int(token))
        tokens = np.concatenate([chosen, permutation[chosen]]).astype(np.int32)
    return [captioner.tokenizer.decode(w) for w in words]


def test_offline_mirror_view_is_the_averaged_decoding(sided):
    images = pictures(6)
    got = [best[0] for best in tokens_of(sided, images, DecodeOptions(mirror_view=True))]
    assert got == reference_greedy(sided, images)
    assert any({"left", "right"} & set(tokens) for tokens in got)  # the swap was exercised
    assert got != [best[0] for best in tokens_of(sided, images, DecodeOptions())]  # and it changes answers


@pytest.mark.parametrize(
    "options",
    [
        DecodeOptions(mirror_view=True),
        DecodeOptions(strategy="beam", beam_size=3, num_captions=3, mirror_view=True),
        DecodeOptions(strategy="sample", num_captions=2, seed=4, mirror_view=True),
    ],
    ids=["greedy", "beam", "sample"],
)
def test_an_image_and_its_mirror_get_mirrored_captions(sided, options):
    """Views swapped, words swapped: the mirrored image's captions are the image's with left and
    right exchanged, for every strategy (sampling with the same seed draws the same)."""
    images = pictures(5, seed=8)
    swap = {"left": "right", "right": "left"}
    plain = tokens_of(sided, images, options)
    mirrored = tokens_of(sided, np.ascontiguousarray(images[:, :, ::-1]), options)
    assert mirrored == [[[swap.get(word, word) for word in caption] for caption in best] for best in plain]


def test_a_mirror_symmetric_image_gets_the_plain_answer(tiny_captioner):
    """Both views equal and no side words in the vocabulary: the average of two equal
    distributions is that distribution, so beam search answers as without the mirror."""
    half = pictures(3, seed=4)[:, :, :16]
    images = np.concatenate([half, half[:, :, ::-1]], axis=2)
    beam = DecodeOptions(strategy="beam", beam_size=3, num_captions=2)
    assert tokens_of(
        tiny_captioner, images, DecodeOptions(mirror_view=True, strategy="beam", beam_size=3, num_captions=2)
    ) == tokens_of(tiny_captioner, images, beam)


def test_mirror_attention_is_on_the_image_grid(sided):
    """Each word's attention, the mirror's columns turned back, still sums to 1 over the grid."""
    caption = sided.caption(list(pictures(1)), DecodeOptions(mirror_view=True, return_attention=True))[0][0]
    weights = np.array(caption.attention)
    assert weights.shape == (len(caption.tokens), sided.num_positions)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-3)


def test_the_queue_takes_what_fits_a_budget_in_order():
    queue: AdmissionQueue[int] = AdmissionQueue(10)
    for cost in (1, 2, 2, 1):
        queue.put_nowait(cost)
    assert queue.take_within(3, cost=lambda c: c, most=8) == [1, 2]  # the next (2) does not fit
    assert queue.take_within(1, cost=lambda c: c, most=8) == []  # nor now: order is kept
    assert queue.take_within(8, cost=lambda c: c, most=1) == [2]
    assert len(queue) == 1


@pytest.mark.parametrize(
    ("mode", "encode_ahead"), [("continuous", True), ("continuous", False), ("static", True), ("none", True)]
)
def test_the_engine_answers_as_offline_with_mirror_and_plain_requests_mixed(sided, mode, encode_ahead):
    """More mirror requests at once than the engine has feature slots (two each), between plain
    ones: every answer is the offline one, token for token."""
    from app.engine import create_engine
    from app.settings import Settings

    kinds = [
        DecodeOptions(mirror_view=True),
        DecodeOptions(),
        DecodeOptions(strategy="beam", beam_size=2, num_captions=2, mirror_view=True),
        DecodeOptions(strategy="sample", num_captions=2, seed=9, mirror_view=True, return_attention=True),
    ]
    images = pictures(48, seed=6)
    jobs = [(image, kinds[i % len(kinds)]) for i, image in enumerate(images)]

    async def serve():
        settings = Settings(batching_mode=mode, encode_ahead=encode_ahead, inference_nice=0, freeze_gc=False)
        engine = create_engine(sided, settings)
        await engine.start()
        try:
            return await asyncio.gather(*(engine.submit(image, options) for image, options in jobs))
        finally:
            await engine.stop()

    results = asyncio.run(serve())
    for (image, options), result in zip(jobs, results, strict=True):
        offline = sided.caption([image], options)[0]
        assert [c.tokens for c in result.captions] == [c.tokens for c in offline]
        np.testing.assert_allclose([c.log_prob for c in result.captions], [c.log_prob for c in offline], atol=1e-5)
