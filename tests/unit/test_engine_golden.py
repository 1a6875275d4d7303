"""Greedy, beam and sampling answers stay what they were before the engine's speed work: the
captions of fixed images under fixed options and seeds, recorded once (tests/unit/golden_captions.json,
written by `python tests/unit/test_engine_golden.py` with the pre-change engine), must come back from
every batching mode and from the offline path, token for token."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from captioning.decoding import DecodeOptions

GOLDEN = Path(__file__).with_name("golden_captions.json")
OPTIONS = {
    "greedy": DecodeOptions(),
    "greedy-short": DecodeOptions(max_length=4),
    "beam": DecodeOptions(strategy="beam", beam_size=3, num_captions=3),
    "beam-wide": DecodeOptions(strategy="beam", beam_size=5, num_captions=2, length_penalty=0.5),
    "sample": DecodeOptions(strategy="sample", num_captions=3, seed=11, temperature=0.8, top_k=5),
    "sample-seed": DecodeOptions(strategy="sample", num_captions=2, seed=12345),
}


def pictures(count: int = 6) -> list[np.ndarray]:
    return list(np.random.default_rng(2024).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8))


def as_records(captions) -> list[dict]:
    return [{"tokens": c.tokens, "log_prob": c.log_prob} for c in captions]


async def engine_answers(captioner, mode: str, names=tuple(OPTIONS), **settings) -> dict[str, list[list[dict]]]:
    from app.engine import create_engine
    from app.settings import Settings

    engine = create_engine(
        captioner, Settings(batching_mode=mode, max_batch_size=24, inference_nice=0, freeze_gc=False, **settings)
    )
    await engine.start()
    if settings.get("greedy_steps_per_call", 1) > 1:  # its multi-step programs compile after start()
        await wait_for_greedy_programs(engine)
    try:
        names = list(names)
        jobs = [engine.submit(image, OPTIONS[name]) for name in names for image in pictures()]
        results = await asyncio.gather(*jobs)  # all at once: every strategy shares the decode steps
    finally:
        await engine.stop()
    per_name = len(pictures())
    return {
        name: [as_records(r.captions) for r in results[i * per_name : (i + 1) * per_name]]
        for i, name in enumerate(names)
    }


async def wait_for_greedy_programs(engine, timeout_s: float = 120) -> None:
    runner = engine.runner
    for _ in range(int(timeout_s / 0.05)):
        if runner.greedy_buckets >= set(runner.features.buckets()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the multi-step greedy programs did not compile")


def offline_answers(captioner) -> dict[str, list[list[dict]]]:
    return {name: [as_records(c) for c in captioner.caption(pictures(), options)] for name, options in OPTIONS.items()}


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        for image, (mine, theirs) in enumerate(zip(got[name], expected[name], strict=True)):
            assert [c["tokens"] for c in mine] == [c["tokens"] for c in theirs], (name, image)
            np.testing.assert_allclose(
                [c["log_prob"] for c in mine],
                [c["log_prob"] for c in theirs],
                rtol=1e-5,
                atol=1e-5,
                err_msg=f"{name}, image {image}",
            )


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize(
    ("mode", "encode_ahead"), [("continuous", True), ("continuous", False), ("static", True), ("none", True)]
)
def test_engine_answers_equal_the_recorded_ones(tiny_captioner, golden, mode, encode_ahead):
    assert_same(asyncio.run(engine_answers(tiny_captioner, mode, encode_ahead=encode_ahead)), golden)


@pytest.mark.parametrize("steps", [1, 3, 4])
def test_greedy_answers_with_several_steps_per_call_equal_the_recorded_ones(tiny_captioner, golden, steps):
    """Only greedy requests in flight: the engine decodes `steps` tokens per compiled call."""
    names = ("greedy", "greedy-short")
    slots_type = type(tiny_captioner.feature_slots(1))
    original, decoding_calls = slots_type.greedy_steps, []

    def counted(self, *args, **kwargs):
        if threading.current_thread().name.startswith("inference-"):  # not the background warm-up
            decoding_calls.append(len(args[1]))
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(slots_type, "greedy_steps", counted)
        got = asyncio.run(engine_answers(tiny_captioner, "continuous", names, greedy_steps_per_call=steps))
    assert_same(got, {name: golden[name] for name in names})
    assert bool(decoding_calls) == (steps > 1)  # the requests went through the multi-step program


def test_offline_answers_equal_the_recorded_ones(tiny_captioner, golden):
    assert_same(offline_answers(tiny_captioner), golden)


if __name__ == "__main__":  # records the golden answers with the code as it is now
    import tempfile

    sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: conftest
    from conftest import make_tiny_bundle

    from captioning.captioner import Captioner

    with tempfile.TemporaryDirectory() as directory:
        captioner = Captioner.load(make_tiny_bundle(Path(directory) / "tiny"))
        answers = offline_answers(captioner)
        assert_same(asyncio.run(engine_answers(captioner, "continuous")), answers)
    GOLDEN.write_text(json.dumps(answers, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
