"""Grounded reranking: the scene a grid of cell labels shows, the order it puts captions in, the
scene head as a verified bundle file, and the same answers offline and through the service."""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import uploads
from conftest import make_tiny_bundle

from captioning import known_answer
from captioning.artifacts import ArtifactError, add_files, add_scene_head, drop_file, record_known_answer
from captioning.decoding import Caption, DecodeOptions
from captioning.grounding import FILE, MOST_OBJECTS_READ, SceneHead, read_scene, rerank
from captioning.scene_checker import check_caption
from captioning.scenes import MAX_OBJECTS, SCENE_KINDS, list_scene

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def label(size: str, colour: str, shape: str) -> int:
    return 1 + SCENE_KINDS.index((size, colour, shape))


def test_each_touching_group_of_one_label_is_one_object_where_its_cells_are():
    grid = np.zeros((6, 6), np.int32)
    red_circle, blue_cross = label("small", "red", "circle"), label("large", "blue", "cross")
    grid[0:2, 0:2] = red_circle  # top left
    grid[4, 5] = red_circle  # a second red circle, bottom right: apart, so another object
    grid[3:5, 1:3] = blue_cross
    grid[3, 3] = blue_cross  # touches the cross's group: still one cross
    grid[5, 0] = blue_cross  # touches it only at a corner: another cross (4-connected groups)
    scene = read_scene(grid.ravel(), (6, 6))
    kinds = sorted((o.size, o.colour, o.shape) for o in scene.objects)
    assert kinds == sorted([("small", "red", "circle")] * 2 + [("large", "blue", "cross")] * 2)
    assert check_caption("there are two small red circles and two large blue crosses", scene).correct
    assert not check_caption("there are two red circles and a blue cross", scene).correct
    first = next(o for o in scene.objects if o.shape == "circle" and o.cx < 3)
    assert (first.cx, first.cy) == (1.0, 1.0)  # the group's mean cell, in cells from the top left corner
    assert check_caption("a red circle is above a blue cross and there is a red circle and a blue cross", scene).correct
    assert read_scene(np.zeros(36, np.int32), (6, 6)).objects == ()


def test_touching_cells_of_one_size_and_colour_are_one_object_of_the_shape_most_of_them_name():
    """The cells of one small object in a JPEG often disagree on its shape: one object, not three."""
    grid = np.zeros((6, 6), np.int32)
    grid[1, 1:3] = label("small", "red", "diamond")
    grid[2, 1] = label("small", "red", "triangle")
    grid[2, 2] = label("small", "red", "diamond")  # three diamond cells, one triangle cell
    grid[2, 3] = label("large", "red", "triangle")  # touches them, but another size: another object
    grid[4, 4] = label("small", "blue", "cross")
    grid[4, 5] = label("small", "blue", "circle")  # a tie: the first cell read (row by row) names it
    scene = read_scene(grid.ravel(), (6, 6))
    kinds = sorted((o.size, o.colour, o.shape) for o in scene.objects)
    assert kinds == [("large", "red", "triangle"), ("small", "blue", "cross"), ("small", "red", "diamond")]
    diamond = next(o for o in scene.objects if o.shape == "diamond")
    assert (diamond.cx, diamond.cy) == (2.0, 2.0)  # the mean of all four of its cells


def test_reranking_puts_the_captions_the_scene_agrees_with_first_and_keeps_the_rest_in_order():
    grid = np.zeros((4, 4), np.int32)
    grid[0, 0] = label("small", "green", "diamond")
    grid[3, 3] = label("small", "green", "triangle")
    scene = read_scene(grid.ravel(), (4, 4))

    def candidate(text, log_prob):
        return Caption(text, text.split(), log_prob, 0.5)

    candidates = [
        candidate("a green diamond and a green diamond", -1.0),  # a second diamond, the triangle unnamed: 2
        candidate("a green diamond", -1.5),  # the triangle unnamed: 1
        candidate("green diamond green", -1.7),  # not the grammar
        candidate("a green diamond and a green triangle", -2.0),  # what the cells show
        candidate("there is a green triangle and a green diamond", -2.5),  # the same facts
    ]
    ordered = rerank(candidates, scene)
    assert [c.text for c in ordered] == [candidates[i].text for i in (3, 4, 1, 0, 2)]
    assert [c.agrees_with_scene for c in ordered] == [True, True, False, False, False]
    assert [c.log_prob for c in ordered] == [-2.0, -2.5, -1.5, -1.0, -1.7]  # the captions' own scores kept
    assert candidates[3].agrees_with_scene is None  # copies: the search's captions are not changed


def test_a_caption_is_written_from_the_scene_only_when_the_best_candidate_names_the_same_objects():
    """No candidate agrees: where the best names as many objects of each colour as the reading, they
    differ on a shape and the reading's caption goes first; where they differ on which objects there
    are, nothing is written."""
    grid = np.zeros((6, 6), np.int32)
    grid[0, 0] = label("small", "orange", "cross")
    grid[5, 5] = label("large", "blue", "square")
    grid[5, 0] = label("small", "blue", "square")
    scene = read_scene(grid.ravel(), (6, 6))

    def candidate(text, log_prob=-1.0, confidence=0.6):
        return Caption(text, text.split(), log_prob, confidence)

    misnamed = [candidate("there is an orange circle and two blue squares", -1.2, 0.7), candidate("an orange circle")]
    ordered = rerank(misnamed, scene)
    written = ordered[0]
    assert written.text == "there is an orange cross and two blue squares"
    assert written.written_from_scene and written.agrees_with_scene
    assert written.log_prob is None and written.attention is None and written.confidence == 0.7  # the best's
    assert check_caption(written.text, scene).correct
    assert [c.text for c in ordered[1:]] == [c.text for c in misnamed] and not any(
        c.written_from_scene for c in ordered[1:]
    )

    assert rerank(misnamed, scene, words=(1, 8))[0].text == misnamed[0].text  # 9 words: longer than allowed
    assert rerank(misnamed, scene, words=(10, 20))[0].text == misnamed[0].text  # shorter than asked
    for other_objects in ("there is an orange circle and a blue square", "there is a red circle and two blue squares"):
        assert not any(c.written_from_scene for c in rerank([candidate(other_objects)], scene))
    assert not any(c.written_from_scene for c in rerank([candidate("orange orange")], scene))  # not the grammar
    agreeing = [candidate("there is an orange cross and two blue squares")]
    assert [c.written_from_scene for c in rerank(agreeing, scene)] == [False]  # a candidate agrees: none written
    six = np.zeros((6, 6), np.int32)
    six[0, ::2] = label("small", "red", "circle")
    six[2, ::2] = label("small", "red", "square")
    six = read_scene(six.ravel(), (6, 6))  # 3 + 3 reds: more objects than a scene of the grammar holds
    assert MAX_OBJECTS < len(six.objects) <= MOST_OBJECTS_READ  # reranked, but nothing written
    as_many_reds = candidate("there are four red circles and two red triangles")
    assert [c.written_from_scene for c in rerank([as_many_reds], six)] == [False]
    with pytest.raises(ValueError, match="1 to 4"):
        list_scene(replace(six, objects=six.objects[:1] * 5))


def test_a_reading_of_more_objects_than_a_scene_holds_reranks_nothing_and_checks_nothing(monkeypatch):
    """Noise or a texture can read as dozens of objects; checking a caption against them would take
    time exponential in their number (on the decoder thread). No caption of the grammar can name
    them all, so none agrees and the beam's order stands."""
    grid = np.zeros((12, 12), np.int32)
    grid[::2, ::2] = label("small", "red", "circle")  # 36 apart red circles
    scene = read_scene(grid.ravel(), (12, 12))
    assert len(scene.objects) == 36
    candidates = [Caption(t, t.split(), -1.0, 0.5) for t in ("there are two red circles", "a red circle")]
    import captioning.grounding

    def exponential(*_):
        raise AssertionError("a caption was checked against a scene no caption can describe")

    monkeypatch.setattr(captioning.grounding, "check_caption", exponential)
    ordered = rerank(candidates, scene)
    assert [c.text for c in ordered] == [c.text for c in candidates]
    assert [c.agrees_with_scene for c in ordered] == [False, False]


def test_the_scene_head_file_round_trips_and_refuses_another_grammar_or_shape(tmp_path):
    rng = np.random.default_rng(0)
    head = SceneHead(rng.normal(size=(8, 1 + len(SCENE_KINDS))).astype(np.float32), np.zeros(1 + len(SCENE_KINDS)))
    head.save(tmp_path / FILE)
    loaded = SceneHead.load(tmp_path / FILE)
    np.testing.assert_array_equal(loaded.weights, head.weights)
    assert loaded.feature_size == 8
    with np.load(tmp_path / FILE, allow_pickle=False) as data:
        arrays = dict(data)
    np.savez(tmp_path / "other.npz", **{**arrays, "kinds": arrays["kinds"][::-1]})
    with pytest.raises(ValueError, match="other object kinds"):
        SceneHead.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="classes"):
        SceneHead(np.zeros((8, 5), np.float32), np.zeros(5, np.float32))


def bundle_with_scene_head(tmp_path, feature_size: int, seed: int = 3):
    bundle = tmp_path / "grounded"
    shutil.copytree(make_tiny_bundle(tmp_path / "tiny"), bundle)  # tiny_captioner's model
    add_scene_head(bundle, random_head(feature_size, seed))
    return bundle


def random_head(feature_size: int, seed: int) -> SceneHead:
    rng = np.random.default_rng(seed)
    classes = 1 + len(SCENE_KINDS)
    return SceneHead(rng.normal(size=(feature_size, classes)).astype(np.float32), rng.normal(size=classes))


def test_grounded_decoding_reranks_the_beam_by_the_scene_heads_reading_of_the_features(tmp_path, tiny_captioner):
    from captioning.captioner import Captioner

    captioner = Captioner.load(bundle_with_scene_head(tmp_path, tiny_captioner.feature_size))
    size = captioner.config.image_size
    images = np.random.default_rng(1).integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    # The cells the encoder's compiled call reads are the head on the features, as numpy computes it.
    _, cells = captioner.feature_slots(8).encode(images, np.arange(len(images)))
    features = captioner.encode(images)
    head = captioner.scene_head
    np.testing.assert_array_equal(cells, (features @ head.weights + head.bias).argmax(-1))

    beam = DecodeOptions(strategy="beam", beam_size=4, num_captions=4)
    grounded = DecodeOptions(strategy="beam", beam_size=4, num_captions=2, grounded=True)
    answers = zip(cells, captioner.caption(images, beam), captioner.caption(images, grounded))
    for image_cells, plain, reranked in answers:
        expected = rerank(plain, read_scene(image_cells, captioner.grid_shape))[:2]
        assert [(c.text, c.agrees_with_scene) for c in reranked] == [(c.text, c.agrees_with_scene) for c in expected]
        assert [c.log_prob for c in reranked] == pytest.approx([c.log_prob for c in expected], abs=1e-6)
        assert all(c.agrees_with_scene is None for c in plain)

    for strategy in ("greedy", "sample"):
        with pytest.raises(ValueError, match="strategy=beam"):
            DecodeOptions(strategy=strategy, grounded=True).validate()
    with pytest.raises(ValueError, match="no scene head"):
        tiny_captioner.check(grounded)


def test_a_scene_head_the_manifest_does_not_vouch_for_is_refused(tmp_path, tiny_captioner):
    from captioning.artifacts import sha256_of
    from captioning.captioner import Captioner

    bundle = bundle_with_scene_head(tmp_path, tiny_captioner.feature_size)
    SceneHead(np.ones((tiny_captioner.feature_size, 1 + len(SCENE_KINDS)), np.float32), np.zeros(61)).save(
        bundle / FILE
    )
    with pytest.raises(ArtifactError, match=FILE):
        Captioner.load(bundle)
    with pytest.raises(ArtifactError, match="reads features of"):
        bundle_with_scene_head(tmp_path / "narrow", tiny_captioner.feature_size + 1)
    # A narrow head listed by hand, past add_scene_head, is refused at load before anything reads it.
    random_head(tiny_captioner.feature_size + 1, seed=3).save(bundle / FILE)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][FILE] = {"sha256": sha256_of(bundle / FILE), "bytes": (bundle / FILE).stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="different models"):
        Captioner.load(bundle)


def test_a_scene_head_from_another_model_is_refused_by_the_known_answer(tmp_path, tiny_captioner):
    """The manifest's checksums vouch for files, not for which model they came from: a head from
    another run, with the manifest rewritten over it, loads unless the known answer ties the head to
    its encoder (captioning.known_answer)."""
    from captioning.artifacts import sha256_of, verify_bundle, write_manifest
    from captioning.captioner import Captioner

    bundle = bundle_with_scene_head(tmp_path, tiny_captioner.feature_size)
    manifest = verify_bundle(bundle)
    labels = manifest[known_answer.KEY][known_answer.SCENE_HEAD]["labels"]
    rows, columns = tiny_captioner.grid_shape
    assert np.shape(labels) == (rows * columns, 2)  # the two likeliest labels of each cell
    assert Captioner.load(bundle).scene_head is not None
    assert Captioner.load(bundle, encoder_precision="bfloat16").scene_head is not None  # as the service serves it

    random_head(tiny_captioner.feature_size, seed=4).save(bundle / FILE)  # another run's head, same shape
    write_manifest(bundle, name="swapped", version="1", training={})  # checksums rewritten, the answer kept
    with pytest.raises(ArtifactError, match="scene head scores its recorded labels"):
        Captioner.load(bundle)

    # A head listed with no part in the answer is not tied to anything; add_files will not list one.
    drop_file(bundle, FILE)
    random_head(tiny_captioner.feature_size, seed=3).save(bundle / FILE)
    with pytest.raises(ValueError, match="add_scene_head"):
        add_files(bundle, (FILE,))
    manifest = verify_bundle(bundle, adding=(FILE,))
    manifest["files"][FILE] = {"sha256": sha256_of(bundle / FILE), "bytes": (bundle / FILE).stat().st_size}
    del manifest[known_answer.KEY][known_answer.SCENE_HEAD]  # as a bundle of round 33 was written
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="no part for the scene head.*record_known_answer"):
        Captioner.load(bundle)
    # add_scene_head refuses a bundle with a head already (it would bless a new one);
    # record_known_answer adds the missing part, once the bundle's own models pass theirs, and only once.
    with pytest.raises(ArtifactError, match="has a scene head already"):
        add_scene_head(bundle, random_head(tiny_captioner.feature_size, seed=3))
    saved = verify_bundle(bundle)
    broken = json.loads(json.dumps(saved))
    broken[known_answer.KEY]["log_probs"][0] += 1.0  # the models no longer pass their own answer
    (bundle / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match="nats away"):
        record_known_answer(bundle)
    (bundle / "manifest.json").write_text(json.dumps(saved))
    assert known_answer.SCENE_HEAD in record_known_answer(bundle)[known_answer.KEY]
    assert Captioner.load(bundle).scene_head is not None
    with pytest.raises(ArtifactError, match="has a known answer already"):
        record_known_answer(bundle)

    # A part of the wrong shape is not an answer (an empty one would compare nothing and pass).
    for part in ({"labels": [[]], "log_probs": [[]]}, {"labels": [[1, 2]] * 3, "log_probs": [[0.0, 0.0]] * 3}):
        manifest = verify_bundle(bundle)
        manifest[known_answer.KEY][known_answer.SCENE_HEAD] = part
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError, match="cannot score its recorded answer"):
            Captioner.load(bundle)

    # add_scene_head adds a head only once the bundle's own models pass their answer.
    drop_file(bundle, FILE)
    (bundle / "manifest.json").write_text(json.dumps({**broken, "files": verify_bundle(bundle)["files"]}))
    with pytest.raises(ArtifactError, match="nats away"):
        add_scene_head(bundle, random_head(tiny_captioner.feature_size, seed=3))
    assert not (bundle / FILE).exists()
    manifest = verify_bundle(bundle)
    (bundle / "manifest.json").write_text(json.dumps({**manifest, known_answer.KEY: None}))
    with pytest.raises(ArtifactError, match="no known answer"):
        add_scene_head(bundle, random_head(tiny_captioner.feature_size, seed=3))


def test_the_service_answers_a_grounded_request_as_the_offline_captioner_does(tmp_path, tiny_captioner):
    from fastapi.testclient import TestClient

    from app.images import decode_upload
    from app.main import create_app
    from app.settings import Settings

    bundle = bundle_with_scene_head(tmp_path, tiny_captioner.feature_size)
    app = create_app(Settings(artifacts_dir=bundle, api_key="k", max_upload_bytes=200_000))
    with TestClient(app, headers={"X-API-Key": "k"}) as client:
        model = client.get("/model").json()
        assert model["grounded"] is True and model["object_reader"] is False
        params = {"strategy": "beam", "beam_size": 3, "num_captions": 3, "grounded": "true"}
        for data in (uploads.png(), uploads.png(colour=(20, 200, 40))):
            response = client.post("/caption", params=params, files={"image": ("a.png", data, "image/png")})
            assert response.status_code == 200, response.text
            captioner = client.app.state.captioner
            decoded = decode_upload(data, max_pixels=10**7, min_side=1, draft_size=captioner.config.image_size)
            options = DecodeOptions(strategy="beam", beam_size=3, num_captions=3, grounded=True)
            offline = captioner.caption([captioner.prepare(decoded.image)], options)[0]
            answered = response.json()["captions"]
            assert [c["text"] for c in answered] == [c.text for c in offline]
            assert [c["agrees_with_scene"] for c in answered] == [c.agrees_with_scene for c in offline]
        greedy = client.post("/caption", params={"grounded": "true"}, files={"image": ("a.png", uploads.png())})
        assert greedy.status_code == 422 and "strategy=beam" in greedy.json()["error"]["message"]
        plain = client.post("/caption", files={"image": ("a.png", uploads.png())}).json()
        assert "agrees_with_scene" not in plain["captions"][0]  # only grounded answers say it


def test_the_service_says_which_caption_was_written_from_the_scene(tmp_path, tiny_captioner, monkeypatch):
    """The tiny random model's captions are not the grammar's, so the writing is forced here: the
    answer marks the written caption, gives it no log_prob (none was decoded), and the protocol
    route scores it NaN."""
    from fastapi.testclient import TestClient

    import captioning.grounding
    from app.main import create_app
    from app.settings import Settings

    def always_written(best, scene, words=None):
        return Caption("there is a red cross", ["there", "is", "a", "red", "cross"], None, best.confidence,
                       agrees_with_scene=True, written_from_scene=True)  # fmt: skip

    monkeypatch.setattr(captioning.grounding, "written_caption", always_written)
    bundle = bundle_with_scene_head(tmp_path, tiny_captioner.feature_size)
    app = create_app(Settings(artifacts_dir=bundle, api_key="k", max_upload_bytes=200_000))
    with TestClient(app, headers={"X-API-Key": "k"}) as client:
        params = {"strategy": "beam", "beam_size": 3, "num_captions": 2, "grounded": "true"}
        response = client.post("/caption", params=params, files={"image": ("a.png", uploads.png(), "image/png")})
        assert response.status_code == 200, response.text
        written, decoded = response.json()["captions"]
        assert (
            decoded["agrees_with_scene"] is False
        )  # the random model's caption: a candidate that agreed stops the writing
        assert written["text"] == "there is a red cross" and written["written_from_scene"] is True
        assert "log_prob" not in written and 0.0 <= written["confidence"] <= 1.0
        assert decoded["written_from_scene"] is False and decoded["log_prob"] <= 0.0
        image = base64.b64encode(uploads.png()).decode()
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}],
                "parameters": params | {"grounded": True, "beam_size": 3, "num_captions": 2}}  # fmt: skip
        scores = client.post("/v2/models/default/infer", json=body)
        assert scores.status_code == 200, scores.text
        outputs = {o["name"]: o["data"] for o in scores.json()["outputs"]}
        assert outputs["captions"][0] == "there is a red cross" and outputs["agrees_with_scene"][0] is True
        assert outputs["scores"][0] is None  # NaN, which JSON writes as null
        assert outputs["written_from_scene"] == [True, False]


def test_the_grounded_wild_report_counts_the_captions_written_from_the_scene(tmp_path, tiny_captioner, monkeypatch):
    """evaluate-wild --grounded says, for the test split and every variation, how many of its first
    captions were written from the reading; a greedy report has no such count."""
    import captioning.grounding
    from training.datasets.shapes_wide import VARIATIONS
    from training.wild import evaluate_wild

    def always_written(best, scene, words=None):
        return Caption("there is a red cross", ["there", "is", "a", "red", "cross"], None, best.confidence,
                       agrees_with_scene=True, written_from_scene=True)  # fmt: skip

    bundle = bundle_with_scene_head(tmp_path, tiny_captioner.feature_size)
    monkeypatch.setattr(captioning.grounding, "written_caption", always_written)
    report = evaluate_wild(bundle, per_variation=2, test_images=3, ood_per_group=1, grounded=True)
    assert report["decoding"]["grounded"] is True
    assert report["test"]["written_from_scene"] == 3  # the random model's captions never agree with its reading
    assert {name: r["written_from_scene"] for name, r in report["variations"].items()} == dict.fromkeys(VARIATIONS, 2)
    greedy = evaluate_wild(bundle, per_variation=1, test_images=1, ood_per_group=1)
    assert "written_from_scene" not in greedy["test"]


def test_a_large_wild_report_is_drawn_a_chunk_at_a_time_from_any_first_picture(tmp_path, tiny_captioner):
    """evaluate-wild --first N --per-variation M scores pictures N..N+M-1 of each variation, drawn and
    decoded a chunk at a time; the chunks are the same pictures, and the same scores, as one list."""
    from training.datasets.shapes_wide import load_wide_split
    from training.wild import evaluate_wild, score_records, wild_chunks

    whole = load_wide_split("test", 5, variation="jpeg", first=10)
    chunks = list(wild_chunks("jpeg", 5, 10, chunk=2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert [r.image_id for c in chunks for r in c] == [r.image_id for r in whole]
    assert [r.encoded for c in chunks for r in c] == [r.encoded for r in whole]
    at_once, correct, confidence = score_records(tiny_captioner, whole)
    chunked, correct_chunked, confidence_chunked = score_records(tiny_captioner, iter(chunks))
    assert at_once == chunked and np.array_equal(correct, correct_chunked)
    assert np.allclose(confidence, confidence_chunked)

    bundle = bundle_with_scene_head(tmp_path, tiny_captioner.feature_size)
    report = evaluate_wild(bundle, per_variation=2, test_images=1, ood_per_group=1, first=10_000)
    assert report["first_picture"] == 10_000
    assert all(r["images"] == 2 for r in report["variations"].values())


def test_calibrate_fits_an_n_best_by_rank_and_grounded_captions_by_answer(tmp_path, tiny_captioner):
    """`training calibrate` on a bundle with a scene head fits the captions of a beam's, a
    sampler's and a grounded beam's n-best of 3 by rank, the grounded ones by answer, where a group
    is big enough: of the tiny random model's 40 images every caption is wrong and disagrees, so
    each rank gets its rate. The captioner calibrates each caption by its fit."""
    import dataclasses

    from captioning.artifacts import verify_bundle
    from captioning.calibration import Calibration
    from captioning.captioner import Captioner
    from training.__main__ import main

    bundle = bundle_with_scene_head(tmp_path, tiny_captioner.feature_size)
    assert main(["calibrate", "--artifacts", str(bundle), "--dataset", "shapes", "--limit", "40"]) == 0
    calibration = Calibration.load(bundle / "calibration.json")
    assert calibration.ranked_width == 3 and set(calibration.ranks) == {"beam", "sample", "grounded_disagreeing"}
    summary = verify_bundle(bundle)["stages"]["calibration"]
    third = summary["grounded beam 3, grounded disagreeing, rank 3"]
    assert third["captions"] == 40 and third["right"] == 0 and third["rate"] == pytest.approx(1 / 42)
    rate = Calibration(0.0, float(np.log(1 / 41)))
    assert [(f.slope, f.bias) for f in calibration.ranks["grounded_disagreeing"]] == [(rate.slope, rate.bias)] * 3

    size = tiny_captioner.config.image_size
    image = np.random.default_rng(2).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    captioner = Captioner.load(bundle)
    grounded = DecodeOptions(strategy="beam", beam_size=3, num_captions=3, grounded=True)
    assert [c.confidence for c in captioner.caption(image, grounded)[0]] == pytest.approx([1 / 42] * 3)
    beam = captioner.caption(image, DecodeOptions(strategy="beam", beam_size=3, num_captions=2))[0]
    assert [c.confidence for c in beam] == pytest.approx([1 / 42] * 2)  # the beam's own rank fits
    wider = captioner.caption(image, DecodeOptions(strategy="beam", beam_size=4, num_captions=2))[0]
    assert [c.confidence for c in wider] == pytest.approx([calibration.apply(c.raw_confidence) for c in wider])

    fitted = dataclasses.replace(calibration, ranks={"grounded_disagreeing": (Calibration(2.0, 1.0, "test"),)})
    drop_file(bundle, "calibration.json")
    fitted.save(bundle / "calibration.json")
    add_files(bundle, ("calibration.json",))
    for caption in Captioner.load(bundle).caption(image, grounded)[0]:  # the first rank's fit serves all three
        assert caption.agrees_with_scene is False
        assert caption.confidence == pytest.approx(Calibration(2.0, 1.0).apply(caption.raw_confidence))


def test_a_written_caption_is_calibrated_as_the_first_of_candidates_none_of_which_agreed(monkeypatch, tiny_captioner):
    """Its confidence is the displaced best candidate's, mapped by the grounded-disagreeing fit of
    its rank; the decoder's captions after it keep theirs, by their ranks and answers."""
    from types import SimpleNamespace

    from captioning.calibration import Calibration

    agreeing = Calibration(1.0, 2.0, "agreeing")
    by_rank = [Calibration(3.0, -1.0, "rank 1"), Calibration(2.0, 0.5, "rank 2"), Calibration(1.0, 1.0, "rank 3")]
    ranks = {"grounded_agreeing": (agreeing,) * 3, "grounded_disagreeing": tuple(by_rank)}
    fits = Calibration(1.0, 0.0, ranks=ranks, ranked_width=3)
    monkeypatch.setattr(tiny_captioner, "calibration", fits)
    grid = np.zeros((4, 4), np.int32)
    grid[0, 0] = label("small", "red", "cross")
    scene = read_scene(grid.ravel(), (4, 4))
    decoded = [
        Caption("a red circle", ["a", "red", "circle"], -1.0, 0.8),
        Caption("a blue cross", ["a", "blue", "cross"], -2.0, 0.5),
    ]
    options = DecodeOptions(strategy="beam", beam_size=3, num_captions=3, grounded=True)
    search = SimpleNamespace(options=options, results=lambda tokenizer: decoded)
    captions = tiny_captioner.results(search, scene)
    assert [c.text for c in captions] == ["there is a red cross", "a red circle", "a blue cross"]
    assert [c.written_from_scene for c in captions] == [True, False, False]
    assert [c.raw_confidence for c in captions] == [0.8, 0.8, 0.5]
    # the written caption is rank 1 of the answer; the decoder's move down a rank and take those fits
    assert [c.confidence for c in captions] == pytest.approx([fit.apply(c) for fit, c in zip(by_rank, (0.8, 0.8, 0.5))])

    short = replace(options, max_length=4)  # "there is a red cross" has 5 words: not written
    search = SimpleNamespace(options=short, results=lambda tokenizer: decoded)
    assert not any(c.written_from_scene for c in tiny_captioner.results(search, scene))
    longer = replace(options, min_length=6)
    search = SimpleNamespace(options=longer, results=lambda tokenizer: decoded)
    assert not any(c.written_from_scene for c in tiny_captioner.results(search, scene))


def test_a_group_too_small_is_not_fitted_and_one_too_pure_or_backwards_gets_its_rate():
    from training.calibrate import MIN_GROUP_CAPTIONS, fit_subgroup, rank_fits

    rng = np.random.default_rng(0)
    raw = rng.uniform(0.5, 1.0, 400)
    captions = [Caption("a red circle", [], 0.0, float(c)) for c in raw]
    rising = (rng.random(400) < raw).astype(float)  # likelier captions right more often
    fit, summary = fit_subgroup(captions, rising, "test")
    assert fit.slope > 0 and summary["captions"] == 400
    assert fit_subgroup(captions[:MIN_GROUP_CAPTIONS], rising[:MIN_GROUP_CAPTIONS], "test")[0] is not None
    assert fit_subgroup(captions[: MIN_GROUP_CAPTIONS - 1], rising[: MIN_GROUP_CAPTIONS - 1], "test")[0] is None
    almost_all_right = np.ones(400)
    almost_all_right[:2] = 0
    fit, summary = fit_subgroup(captions, almost_all_right, "test")
    assert fit.slope == 0 and fit.apply(0.5) == pytest.approx(399 / 402) and "under 3" in summary["why_a_rate"]
    assert fit_subgroup(captions, np.zeros(400), "test")[0].apply(0.9) == pytest.approx(1 / 402)
    falling = (raw < 0.75).astype(float)  # likelier captions wrong
    fit, summary = fit_subgroup(captions, falling, "test")
    assert fit.slope == 0 and "fell" in summary["why_a_rate"]

    # rank_fits sorts each n-best's captions by kind and rank: here the first caption of 60 images
    # agrees and is right, the second disagrees and is wrong; of 20 more, the reverse.
    n_best, correct = [], []
    for i, c0 in enumerate(raw[:80]):
        first_agrees = i < 60
        n_best.append([Caption("a", [], 0.0, float(c0), agrees_with_scene=first_agrees),
                       Caption("b", [], 0.0, float(c0) * 0.9, agrees_with_scene=not first_agrees)])  # fmt: skip
        correct.append(np.array([1.0, 0.0]) if first_agrees else np.array([0.0, 1.0]))
    answer = lambda caption: "grounded_agreeing" if caption.agrees_with_scene else "grounded_disagreeing"  # noqa: E731
    fits, summary = rank_fits(n_best, correct, answer, "test", "grounded")
    assert {name: (group["captions"], group["right"]) for name, group in summary.items()} == {
        "grounded, grounded agreeing, rank 1": (60, 60),
        "grounded, grounded agreeing, rank 2": (20, 20),  # under 30: no fit, the first rank's serves
        "grounded, grounded disagreeing, rank 1": (20, 0),
        "grounded, grounded disagreeing, rank 2": (60, 0),
    }
    assert fits["grounded_agreeing"][1] is None and fits["grounded_disagreeing"][0] is None
    assert fits["grounded_agreeing"][0].apply(0.7) == pytest.approx(61 / 62)
    assert fits["grounded_disagreeing"][1].apply(0.7) == pytest.approx(1 / 62)
