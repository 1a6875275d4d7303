"""Calibrated confidence and the out-of-domain check: the fits, the bundle files (verified like
every other file), and the API fields and setting, on the tiny random bundle."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import uploads
from fastapi.testclient import TestClient
from PIL import Image

from captioning.artifacts import ArtifactError, add_files
from captioning.calibration import METHOD, Calibration, expected_calibration_error, fit_calibration
from captioning.decoding import DecodeOptions
from captioning.domain import STATISTICS, DomainModel, fit_domain, image_statistics, pool_features

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


# ------------------------------------------------------------------------------------ calibration


def test_calibration_fit_recovers_a_known_relation_and_lowers_ece():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.3, 1.0, 4000)
    truth = Calibration(slope=6.0, bias=2.0)
    correct = rng.random(raw.size) < np.array([truth.apply(c) for c in raw])
    fitted = fit_calibration(raw, correct)
    assert fitted.slope == pytest.approx(6.0, rel=0.15) and fitted.bias == pytest.approx(2.0, abs=0.3)
    calibrated = np.array([fitted.apply(c) for c in raw])
    assert expected_calibration_error(calibrated, correct) < 0.03 < expected_calibration_error(raw, correct)


def test_ece_of_perfect_and_overconfident_predictions():
    assert expected_calibration_error([1.0, 1.0, 0.0, 0.0], [1, 1, 0, 0]) == 0.0
    assert expected_calibration_error([0.9] * 10, [1] * 5 + [0] * 5) == pytest.approx(0.4)


def test_calibration_file_round_trip_and_refuses_junk(tmp_path):
    Calibration(2.5, -0.5, "test").save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json") == Calibration(2.5, -0.5, "test")
    both = Calibration(2.5, -0.5, "greedy", mirror_view=Calibration(3.0, 0.25, "mirror"))
    both.save(tmp_path / "both.json")
    assert Calibration.load(tmp_path / "both.json") == both
    assert both.for_caption("greedy", mirror_view=True).slope == 3.0
    assert both.for_caption("greedy", mirror_view=False).slope == 2.5
    assert Calibration(1.0, 0.0).for_caption("greedy", mirror_view=True) == Calibration(1.0, 0.0)  # one fit serves both
    fit = {slope: Calibration(slope, 0.0) for slope in (1.0, 1.5, 2.0, 3.0, 4.0, 9.0)}
    every = Calibration(
        2.5,
        -0.5,
        "greedy",
        mirror_view=Calibration(3.5, 0.25),
        ranks={
            "beam": (fit[4.0], fit[1.0], None),  # too few third captions to fit: the second's serves them
            "sample": (fit[4.0], fit[1.5]),
            "grounded_agreeing": (fit[9.0],),
            "grounded_disagreeing": (fit[2.0], fit[3.0]),
        },
        ranked_width=3,
    )
    every.save(tmp_path / "every.json")
    assert Calibration.load(tmp_path / "every.json") == every
    picked = {  # (strategy, mirror_view, width, rank, agrees_with_scene): the fit's slope
        ("greedy", False, 1, 0, None): 2.5,
        ("greedy", True, 1, 0, None): 3.5,
        ("beam", False, 3, 0, None): 4.0,
        ("beam", False, 3, 1, None): 1.0,
        ("beam", False, 3, 2, None): 1.0,
        ("beam", True, 3, 0, None): 3.5,  # a mirrored first caption: the mirror fit
        ("beam", True, 3, 1, None): 1.0,
        ("beam", False, 5, 1, None): 2.5,  # another width: no rank fits
        ("beam", True, 5, 1, None): 3.5,
        ("sample", False, 3, 2, None): 1.5,
        ("beam", False, 3, 0, True): 9.0,
        ("beam", False, 3, 2, True): 9.0,
        ("beam", True, 3, 1, False): 3.0,  # grounded fits serve the mirror view too
        ("beam", True, 3, 0, True): 9.0,  # a grounded first caption: its answer's fit, mirror or not
        ("beam", False, 5, 0, True): 9.0,  # ... and at any width
        ("beam", False, 4, 1, False): 2.5,  # below it, another width: no rank fits
        ("sample", False, 1, 0, None): 2.5,  # one sample: not an n-best of 3
    }
    for (strategy, mirror, width, rank, agrees), slope in picked.items():
        assert every.for_caption(strategy, mirror, width, rank, agrees).slope == slope, (strategy, mirror, width, rank)
    # Calibrated before these fits existed: the greedy (or mirror) fit serves every caption.
    assert both.for_caption("beam", False, 3, 2, True) == both
    assert both.for_caption("sample", True, 3, 1).slope == 3.0
    leading_gap = dataclasses.replace(every, ranks={"beam": (None, fit[1.0])})
    assert leading_gap.for_caption("beam", False, 3, 0).slope == 2.5  # no first-rank fit: the greedy one
    hash(every)  # a frozen fit stays hashable
    with pytest.raises(ValueError, match="unknown n-best kinds"):
        (tmp_path / "odd.json").write_text(json.dumps({"method": METHOD, "slope": 1, "bias": 0, "ranks": {"x": []}}))
        Calibration.load(tmp_path / "odd.json")
    (tmp_path / "bad.json").write_text(json.dumps({"method": "magic", "slope": 1, "bias": 0}))
    with pytest.raises(ValueError, match="unknown calibration method"):
        Calibration.load(tmp_path / "bad.json")


# ----------------------------------------------------------------------------------------- domain


def scene_like(rng, count: int, background: int = 40) -> np.ndarray:
    """64x64 inputs with one bright named-colour square on a plain background, like the domain."""
    images = np.full((count, 64, 64, 3), background, np.uint8)
    for image in images:
        x, y = rng.integers(4, 40, 2)
        image[y : y + 14, x : x + 14] = (225, 35, 35)
    return images


def test_domain_score_is_high_in_domain_and_low_far_away(tmp_path):
    rng = np.random.default_rng(1)
    features = lambda n, shift: np.maximum(rng.normal(shift, 1.0, (n, 16, 8)), 0)  # noqa: E731 [B, N, D]
    train, held_out = pool_features(features(2000, 1.0)), pool_features(features(500, 1.0))
    model = fit_domain(train, held_out, image_statistics(scene_like(rng, 300)), quantile=0.995, margin=1.25)
    inside = model.scores(features(200, 1.0), scene_like(rng, 200))
    assert (inside >= 0.5).mean() >= 0.99
    far_features = model.scores(features(50, 3.0), scene_like(rng, 50))  # encoder says no
    assert (far_features < 0.5).all()
    noise = rng.integers(0, 256, (50, 64, 64, 3)).astype(np.uint8)  # image statistics say no
    assert (model.scores(features(50, 1.0), noise) < 0.5).all()
    blank = np.full((5, 64, 64, 3), 40, np.uint8)  # nothing stands out: no objects
    assert (model.scores(features(5, 1.0), blank) < 0.5).all()
    model.save(tmp_path / "d.npz")
    loaded = DomainModel.load(tmp_path / "d.npz")
    probe = features(5, 1.0), scene_like(rng, 5)
    assert np.allclose(loaded.scores(*probe), model.scores(*probe))


def test_a_frame_left_out_of_the_statistics_makes_a_thin_border_harmless(tmp_path):
    """A screenshot's 1-px black border made an audit's drawings 0/24 in domain: the background,
    read from the outer 2 px, came out mid-grey. Fitted with frame=3, the border is left out."""
    rng = np.random.default_rng(2)
    scenes = scene_like(rng, 20, background=250)
    framed = scenes.copy()
    framed[:, 0], framed[:, -1], framed[:, :, 0], framed[:, :, -1] = 0, 0, 0, 0
    np.testing.assert_allclose(image_statistics(framed, frame=3), image_statistics(scenes, frame=3))
    assert not np.allclose(image_statistics(framed), image_statistics(scenes))
    features = np.maximum(rng.normal(1.0, 1.0, (500, 16, 8)), 0)
    pooled = pool_features(features)
    model = fit_domain(pooled, pooled, image_statistics(scene_like(rng, 300, 250), 3), frame=3)
    assert (model.scores(features[:20], framed) >= 0.5).all()
    model.save(tmp_path / "framed.npz")
    assert DomainModel.load(tmp_path / "framed.npz").frame == 3
    unframed = DomainModel(model.mean, model.precision, model.threshold, model.statistics_low, model.statistics_high)
    np.savez(  # a domain.npz written before the frame existed: read as frame 0
        tmp_path / "old.npz",
        **{k: v for k, v in np.load(tmp_path / "framed.npz").items() if k != "frame"},
    )
    assert DomainModel.load(tmp_path / "old.npz").frame == unframed.frame == 0


def test_image_statistics_tell_a_scene_from_text_like_strokes():
    rng = np.random.default_rng(3)
    scene = image_statistics(scene_like(rng, 1))[0]
    strokes = np.full((1, 64, 64, 3), 235, np.uint8)
    strokes[:, 10:54:4, 6:58] = 20  # dark lines on paper: foreground that is no named colour
    text = image_statistics(strokes)[0]
    named = STATISTICS.index("named_colour_share")
    assert scene[named] > 0.9 and text[named] < 0.1


def test_domain_file_is_plain_arrays(tmp_path):
    np.savez(
        tmp_path / "evil.npz",
        mean=np.array([object()], dtype=object),
        precision=np.eye(1),
        threshold=1.0,
        statistics_low=np.zeros(5),
        statistics_high=np.ones(5),
    )
    with pytest.raises(ValueError):  # allow_pickle=False: object arrays are refused
        DomainModel.load(tmp_path / "evil.npz")


# ------------------------------------------------------------------------------------------ bundle


def anchored_domain(captioner, image: np.ndarray) -> DomainModel:
    """A domain model centred on `image`'s features with a small radius: that image (and nothing
    very different) is in the domain, so tests know the answer with a random encoder."""
    pooled = pool_features(captioner.encode(image[None]))
    wide_open = np.full(len(STATISTICS), 1e9)
    return DomainModel(pooled[0], np.eye(pooled.shape[1]), 1e-3, -wide_open, wide_open)


@pytest.fixture(scope="module")
def in_domain_image(tiny_captioner) -> np.ndarray:
    size = tiny_captioner.config.image_size
    return np.full((size, size, 3), 40, np.uint8)


@pytest.fixture(scope="module")
def extras_bundle(tiny_bundle, tiny_captioner, in_domain_image, tmp_path_factory):
    """The tiny bundle plus calibration.json and domain.npz, added to its manifest."""
    bundle = tmp_path_factory.mktemp("extras") / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    Calibration(4.0, 1.0, "test", mirror_view=Calibration(3.0, 0.5, "test, mirror")).save(bundle / "calibration.json")
    anchored_domain(tiny_captioner, in_domain_image).save(bundle / "domain.npz")
    add_files(bundle, ("calibration.json", "domain.npz"))
    return bundle


def test_bundle_extras_load_and_calibrate_the_confidence(extras_bundle, in_domain_image):
    from captioning.captioner import Captioner

    captioner = Captioner.load(extras_bundle)
    assert captioner.calibration.slope == 4.0 and captioner.domain is not None
    caption = captioner.caption([in_domain_image])[0][0]
    assert caption.raw_confidence is not None
    assert caption.confidence == pytest.approx(Calibration(4.0, 1.0).apply(caption.raw_confidence))
    mirrored = captioner.caption([in_domain_image], DecodeOptions(mirror_view=True))[0][0]
    assert mirrored.confidence == pytest.approx(Calibration(3.0, 0.5).apply(mirrored.raw_confidence))
    noise = np.random.default_rng(0).integers(0, 256, in_domain_image.shape).astype(np.uint8)
    scores = captioner.domain_scores(np.stack([in_domain_image, noise]))
    assert scores[0] > 0.99 and scores[1] < 0.5


def test_the_engine_scores_the_domain_as_the_offline_check_does(extras_bundle, in_domain_image):
    """FeatureSlots.encode (the engine's path) returns pooled features; the scores from them are
    the offline path's (Captioner.domain_scores: the full grid pooled by captioning.domain)."""
    from captioning.captioner import Captioner

    captioner = Captioner.load(extras_bundle)
    noise = np.random.default_rng(1).integers(0, 256, (3, *in_domain_image.shape)).astype(np.uint8)
    images = np.concatenate([in_domain_image[None], noise])
    pooled, _ = captioner.feature_slots(8).encode(images, np.arange(len(images)))
    np.testing.assert_allclose(pooled, pool_features(captioner.encode(images)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        captioner.domain.combined_scores(pooled, captioner.domain.image_statistics(images)),
        captioner.domain_scores(images),
        rtol=1e-4,
        atol=1e-6,
    )
    # The engine's runner: the image statistics in their own thread, beside the encoder's call.
    from app.engine.runner import ModelRunner

    runner = ModelRunner(captioner, 8)
    try:
        slots, scores, _ = runner.encode(images)
    finally:
        runner.close()
    assert len(set(slots)) == len(images)
    np.testing.assert_allclose(scores, captioner.domain_scores(images), rtol=1e-4, atol=1e-6)


def test_bundle_extras_are_verified(extras_bundle, tmp_path):
    from captioning.captioner import Captioner

    tampered = tmp_path / "tampered"
    shutil.copytree(extras_bundle, tampered)
    with open(tampered / "domain.npz", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match=r"domain.npz has \d+ bytes, the manifest says"):
        Captioner.load(tampered)

    unlisted = tmp_path / "unlisted"
    shutil.copytree(extras_bundle, unlisted)
    manifest = json.loads((unlisted / "manifest.json").read_text())
    del manifest["files"]["calibration.json"]
    (unlisted / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="calibration.json is not in the manifest"):
        Captioner.load(unlisted)


# --------------------------------------------------------------------------------------------- API


def post(client, pixels: np.ndarray, mirror_view: bool = False):
    return client.post(
        "/caption",
        params={"mirror_view": str(mirror_view).lower()},
        files={"image": ("x.png", uploads.encode(Image.fromarray(pixels), "PNG"), "image/png")},
    )


@pytest.mark.parametrize("policy", ["caption", "reject"])
def test_caption_reports_the_domain_and_the_setting_decides(extras_bundle, in_domain_image, policy):
    from app.main import create_app
    from app.settings import Settings

    noise = np.random.default_rng(2).integers(0, 256, (48, 48, 3)).astype(np.uint8)
    with TestClient(create_app(Settings(artifacts_dir=extras_bundle, api_key=None, out_of_domain=policy))) as client:
        inside = post(client, in_domain_image)
        assert inside.status_code == 200, inside.text
        body = inside.json()
        assert body["in_domain"] is True and body["domain_score"] > 0.99
        assert 0.0 <= body["captions"][0]["confidence"] <= 1.0
        outside = post(client, noise)
        if policy == "caption":
            assert outside.status_code == 200
            assert outside.json()["in_domain"] is False and outside.json()["domain_score"] < 0.5
            # The engine scores the features of its own encoder pass: the same as a separate one.
            captioner = client.app.state.captioner
            offline = captioner.domain_scores(captioner.prepare(Image.fromarray(noise))[None])[0]
            assert outside.json()["domain_score"] == pytest.approx(offline, abs=1e-4)
        else:
            assert outside.status_code == 422
            assert outside.json()["error"]["code"] == "out_of_domain" and outside.json()["request_id"]
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert {"in_domain", "domain_score"} <= set(schema["CaptionResponse"]["properties"])


def test_the_service_answers_the_calibrated_confidence(extras_bundle, in_domain_image):
    """/caption's confidence is the bundle's calibration applied to the search's raw confidence, as
    the offline Captioner gives it (a regression: the engine once answered the raw one)."""
    from app.main import create_app
    from app.settings import Settings

    with TestClient(create_app(Settings(artifacts_dir=extras_bundle, api_key=None))) as client:
        captioner = client.app.state.captioner
        for mirror_view in (False, True):
            served = post(client, in_domain_image, mirror_view=mirror_view).json()["captions"][0]
            offline = captioner.caption([in_domain_image], DecodeOptions(mirror_view=mirror_view))[0][0]
            assert offline.confidence != pytest.approx(offline.raw_confidence, abs=1e-3)  # the calibration matters
            assert served["confidence"] == pytest.approx(offline.confidence, abs=1e-4)


def test_bundle_without_a_domain_model_omits_the_fields(tiny_bundle, in_domain_image):
    from app.main import create_app
    from app.settings import Settings

    with TestClient(create_app(Settings(artifacts_dir=tiny_bundle, api_key=None))) as client:
        body = post(client, in_domain_image).json()
        assert "in_domain" not in body and "domain_score" not in body


def test_calibrate_and_fit_domain_that_fail_leave_the_bundle_as_it_was(extras_bundle, tmp_path, capsys):
    # They used to delete the file they refit before loading anything: a typo in an option lost it.
    from captioning.artifacts import verify_bundle
    from training.__main__ import main

    bundle = shutil.copytree(extras_bundle, tmp_path / "bundle")
    before = verify_bundle(bundle)["files"]
    assert main(["fit-domain", "--artifacts", str(bundle), "--dataset", "list", "--data", "listfile=x.csv"]) == 2
    assert "unknown option(s) listfile" in capsys.readouterr().err
    assert main(["calibrate", "--artifacts", str(bundle), "--dataset", "shapes", "--data", "size=64"]) == 2
    assert verify_bundle(bundle)["files"] == before  # both files still there and vouched for
    with pytest.raises(SystemExit):
        main(["calibrate", "--artifacts", str(bundle), "--split", "dev"])  # not a split: argparse refuses
