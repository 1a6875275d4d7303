"""Self-critical training: the CIDEr-D reward matches pycocoevalcap's, and an update raises the reward."""

from __future__ import annotations

import numpy as np
import pytest

from training.cider_d import CiderD

REFERENCES = [
    ["a red circle", "there is a red circle", "one red circle"],
    ["two blue squares and a green cross", "a green cross and two blue squares", "there are two blue squares"],
    ["a purple diamond is above an orange circle", "an orange circle and a purple diamond", "a purple diamond"],
]


def test_cider_d_matches_pycocoevalcap_when_idf_comes_from_the_same_images():
    from pycocoevalcap.cider.cider import Cider

    candidates = ["a red circle", "two blue squares and a cross", "a purple diamond"]
    _, theirs = Cider().compute_score(
        {i: refs for i, refs in enumerate(REFERENCES)}, {i: [c] for i, c in enumerate(candidates)}
    )
    ours = CiderD(REFERENCES)
    for i, candidate in enumerate(candidates):
        assert ours.score(candidate, REFERENCES[i]) == pytest.approx(theirs[i], rel=1e-6)
    assert ours.score("a red circle", REFERENCES[0]) > ours.score("a blue circle", REFERENCES[0])


@pytest.mark.parametrize("input_feeding", [False, True])
def test_a_self_critical_update_raises_the_expected_reward(tiny_bundle, input_feeding, tmp_path):
    """Reward 1 for captions that say "red": after a few updates, samples say it more often,
    i.e. the expected negative reward went down. With input feeding too (its state carries the context)."""
    from conftest import make_tiny_bundle

    from captioning.captioner import Captioner
    from training.scst import SelfCriticalTrainer, scst_batch

    bundle = make_tiny_bundle(tmp_path / "fed", input_feeding=True) if input_feeding else tiny_bundle
    captioner = Captioner.load(bundle)  # its own copy: the session-wide one stays untouched
    size = captioner.config.image_size
    images = np.random.default_rng(0).integers(0, 256, (8, size, size, 3)).astype(np.uint8)
    trainer = SelfCriticalTrainer(captioner.decoder, captioner.config.max_length, learning_rate=3e-2)
    says_red = lambda i, text: float("red" in text.split())  # noqa: E731

    def expected_reward() -> float:
        features = captioner.encoder(images.astype(np.float32)).numpy()
        sequences = trainer.generate(np.repeat(features, 32, axis=0), greedy=False, seed=99)
        return float(np.mean([says_red(0, " ".join(captioner.tokenizer.decode(s))) for s in sequences]))

    before = expected_reward()
    for step in range(12):
        result = scst_batch(trainer, captioner.encoder, captioner.tokenizer, images, says_red, samples=4, seed=step)
        assert np.isfinite(result["loss"])
    after = expected_reward()
    assert after > before + 0.2, (before, after)


def test_only_better_leaves_the_model_alone_when_no_sample_beats_the_greedy_caption(tiny_bundle):
    """`--only-better`: samples worse than the greedy caption are not pushed down. With a reward that
    only the greedy caption earns, every advantage is clipped to 0 and the update (a fresh Adam: no
    momentum yet) changes no weight; the plain update, on the same batch, does change them."""
    from captioning.captioner import Captioner
    from training.scst import SelfCriticalTrainer, scst_batch

    captioner = Captioner.load(tiny_bundle)
    size = captioner.config.image_size
    images = np.random.default_rng(1).integers(0, 256, (4, size, size, 3)).astype(np.uint8)
    trainer = SelfCriticalTrainer(captioner.decoder, captioner.config.max_length, learning_rate=3e-2)
    features = captioner.encoder(images.astype(np.float32)).numpy()
    greedy = [" ".join(captioner.tokenizer.decode(ids)) for ids in trainer.generate(features, greedy=True)]
    only_greedy = lambda i, text: float(text == greedy[i])  # noqa: E731
    before = [w.copy() for w in captioner.decoder.get_weights()]

    result = scst_batch(trainer, captioner.encoder, captioner.tokenizer, images, only_greedy, 4, 0, only_better=True)
    assert result["greedy_reward"] == 1.0 and result["reward"] < 1.0  # some samples are worse
    assert all(np.array_equal(a, b) for a, b in zip(before, captioner.decoder.get_weights()))

    scst_batch(trainer, captioner.encoder, captioner.tokenizer, images, only_greedy, 4, 0)
    assert not all(np.array_equal(a, b) for a, b in zip(before, captioner.decoder.get_weights()))


def test_only_better_keeps_the_positive_advantages(tiny_bundle):
    """The clip takes away only the negative part: on the same samples, the advantages passed to the
    update are the plain ones with those below zero set to zero, and some are left above zero."""
    from captioning.captioner import Captioner
    from training.scst import SelfCriticalTrainer, scst_batch

    captioner = Captioner.load(tiny_bundle)
    size = captioner.config.image_size
    images = np.random.default_rng(2).integers(0, 256, (4, size, size, 3)).astype(np.uint8)
    trainer = SelfCriticalTrainer(captioner.decoder, captioner.config.max_length, learning_rate=3e-2)
    passed = []
    trainer.step = lambda features, sequences, advantages: passed.append(advantages.copy()) or 0.0
    length = lambda i, text: float(len(text.split()))  # noqa: E731  samples longer than greedy beat it
    scst_batch(trainer, captioner.encoder, captioner.tokenizer, images, length, 8, 0)
    scst_batch(trainer, captioner.encoder, captioner.tokenizer, images, length, 8, 0, only_better=True)
    plain, clipped = passed
    assert (plain < 0).any() and (plain > 0).any()
    np.testing.assert_array_equal(clipped, np.maximum(plain, 0.0))


def test_sampled_sequences_stop_at_end():
    from captioning.tokenizer import END_ID, PAD_ID
    from training.scst import cut_at_end

    cut = cut_at_end(np.array([[5, END_ID, 7, 8], [5, 6, 7, 8]]))
    assert cut.tolist() == [[5, END_ID, PAD_ID, PAD_ID], [5, 6, 7, 8]]


def test_finetune_command_keeps_the_best_held_out_weights(tmp_path):
    """`finetune-scst --dev-images`: the held-out images are scored before and during the run, and the
    bundle written carries the weights of the best score (checked by scoring them again)."""
    from conftest import make_tiny_bundle

    from captioning.artifacts import add_scene_head, verify_bundle
    from captioning.captioner import Captioner
    from captioning.grounding import SceneHead
    from training.__main__ import main
    from training.datasets.shapes import load_split
    from training.scst import SelfCriticalTrainer, greedy_reward, make_reward

    captions = [c for record in load_split("train", size=40) for c in record.captions]
    start = make_tiny_bundle(tmp_path / "start", captions=captions, image_size=64, training={})
    head = SceneHead(np.random.default_rng(0).normal(size=(32, 61)).astype(np.float32), np.zeros(61, np.float32))
    add_scene_head(start, head)  # trained with the encoder, which SCST leaves alone: carried over
    output = tmp_path / "scst"
    flags = ["--dataset", "shapes", "--train-limit", "24", "--dev-images", "8", "--eval-every", "2"]
    status = main(["finetune-scst", "--artifacts", str(start), "--output", str(output), "--steps", "5", *flags,
                   "--batch-size", "4", "--samples", "2", "--learning-rate", "3e-2", "--only-better"])  # fmt: skip
    assert status == 0
    assert verify_bundle(output)["training"]["scst"]["hyper_parameters"]["only_better"] is True
    held_out = verify_bundle(output)["training"]["scst"]["held_out"]
    assert held_out["images"] == 8 and [step for step, _ in held_out["curve"]] == [0, 2, 4, 5]
    best_step, best = max(held_out["curve"], key=lambda point: point[1])
    assert held_out["best_step"] == best_step and held_out["improved"] == (best_step > 0)

    captioner = Captioner.load(output)
    np.testing.assert_array_equal(captioner.scene_head.weights, head.weights)
    records = load_split("train", size=24)
    dev = records[16:]
    train_refs = [list(r.captions) for r in records[:16]]
    features = captioner.encoder(np.stack([captioner.prepare(r.pixels) for r in dev]).astype("float32")).numpy()
    trainer = SelfCriticalTrainer(captioner.decoder, captioner.config.max_length, 1e-3)
    reward = make_reward([list(r.captions) for r in dev], None, train_refs, 0.0)
    assert greedy_reward(trainer, captioner.tokenizer, features, reward) == pytest.approx(best, abs=1e-3)
