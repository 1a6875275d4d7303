"""The object reader (captioning/object_reader.py): the windows it cuts, how it re-reads a scene's
shapes, the bundle file, grounded decoding with it offline and in the service, and its fit."""

from __future__ import annotations

import dataclasses
import json
import shutil

import keras
import numpy as np
import pytest
import uploads
from test_grounding import bundle_with_scene_head

from captioning.artifacts import ArtifactError, add_files, drop_file, verify_bundle
from captioning.decoding import DecodeOptions
from captioning.grounding import MOST_OBJECTS_READ, read_scene, rerank
from captioning.object_reader import CROP, FILE, WINDOW, ObjectReader, crop_windows, window_boxes
from captioning.scenes import SHAPES, Scene, ShapeObject

RED, BLUE = (255, 0, 0), (0, 0, 255)


def picture(side=96, squares=()):
    """A black picture with filled squares: (colour, x0, y0, width)."""
    image = np.zeros((side, side, 3), np.uint8)
    for colour, x0, y0, width in squares:
        image[y0 : y0 + width, x0 : x0 + width] = colour
    return image


def colour_reader() -> keras.Model:
    """A reader whose answer is known: a window mostly red is a cross, mostly blue a circle."""
    crops = keras.Input((CROP, CROP, 3))
    mean = keras.layers.GlobalAveragePooling2D()(crops)
    shape = keras.layers.Dense(len(SHAPES), name="shape")
    model = keras.Model(crops, shape(mean))
    kernel = np.zeros((3, len(SHAPES)), np.float32)
    kernel[0, SHAPES.index("cross")], kernel[2, SHAPES.index("cross")] = 1.0, -1.0
    kernel[2, SHAPES.index("circle")], kernel[0, SHAPES.index("circle")] = 1.0, -1.0
    shape.set_weights([kernel, np.zeros(len(SHAPES), np.float32)])
    return model


def test_a_window_is_centred_on_its_object_and_black_outside_the_picture():
    image = picture(squares=[(RED, 40, 20, 10)])  # pixels 40..49 x 20..29: centre (45, 25)
    boxes = window_boxes(np.array([(45.0, 25.0), (0.0, 0.0)]), ["small", "large"], 96)
    crops = crop_windows(image[None], boxes, np.zeros(2, np.int32)).numpy()
    assert crops.shape == (2, CROP, CROP, 3)
    centred = crops[0, :, :, 0] > 127
    rows, columns = np.nonzero(centred)
    assert rows.mean() == pytest.approx((CROP - 1) / 2, abs=0.5) and columns.mean() == pytest.approx(
        (CROP - 1) / 2, abs=0.5
    )
    # The small window is 21% of the side (20 px): the 10 px square fills about half of it across.
    assert centred.sum() == pytest.approx((CROP * 10 / (WINDOW["small"] * 96)) ** 2, rel=0.15)
    # A window at the corner: the quarter inside the picture is the picture's (black here, and the
    # square is not in it), the rest is black too; a window on the square's corner sees a quarter of it.
    assert crops[1].max() == 0
    corner = window_boxes(np.array([(40.0, 20.0)]), ["small"], 96)
    seen = crop_windows(image[None], corner, np.zeros(1, np.int32)).numpy()[0, :, :, 0] > 127
    assert seen[CROP // 2 :, CROP // 2 :].mean() > 0.8 and seen[: CROP // 2 - 1].sum() == 0


def test_a_reader_of_other_inputs_or_outputs_is_refused():
    crops = keras.Input((CROP, CROP, 3))
    with pytest.raises(ValueError, match="shapes"):
        ObjectReader(keras.Model(crops, keras.layers.Dense(3)(keras.layers.Flatten()(crops))))
    smaller = keras.Input((16, 16, 3))
    with pytest.raises(ValueError, match="crops"):
        ObjectReader(keras.Model(smaller, keras.layers.Dense(len(SHAPES))(keras.layers.Flatten()(smaller))))


def obj(shape, colour, size, cx, cy):
    return ShapeObject(shape, colour, size, cx, cy, 0.5)


def test_refine_takes_each_objects_shape_from_its_window_and_keeps_the_rest():
    reader = ObjectReader(colour_reader())
    # A 12x12 grid over 96 px: a cell is 8 px; a square at (40, 20) of 10 px is centred on cell (5.6, 3.1).
    first = picture(squares=[(RED, 40, 20, 10), (BLUE, 70, 70, 10)])
    last = picture(squares=[(BLUE, 40, 20, 10), (RED, 70, 70, 10)])  # the same places, colours swapped
    places = [(45 / 8, 25 / 8), (75 / 8, 75 / 8)]
    two = Scene(12, tuple(obj("square", "red", "small", x, y) for x, y in places), "")
    crowd = Scene(12, tuple(obj("square", "red", "small", *places[0]) for _ in range(MOST_OBJECTS_READ + 1)), "")
    empty = Scene(12, (), "")
    images = np.stack([first, first, last, last])
    refined = reader.refine(images, [two, crowd, two, empty], (12, 12))
    # Each object is read in its own picture: the windows of the third scene are cut from `last`.
    assert [o.shape for o in refined[0].objects] == ["cross", "circle"]
    assert [o.shape for o in refined[2].objects] == ["circle", "cross"]
    assert [dataclasses.replace(o, shape="square") for o in refined[0].objects] == list(two.objects)
    assert refined[1] == crowd and refined[3] == empty  # no caption can agree with a crowd: left as read


def bundle_with_reader(tmp_path, feature_size: int):
    bundle = bundle_with_scene_head(tmp_path, feature_size)
    colour_reader().save(bundle / FILE)
    add_files(bundle, (FILE,))
    return bundle


def test_grounded_decoding_reranks_by_the_reading_the_object_reader_refines(tmp_path, tiny_captioner):
    from captioning.captioner import Captioner

    captioner = Captioner.load(bundle_with_reader(tmp_path, tiny_captioner.feature_size))
    assert isinstance(captioner.object_reader, ObjectReader)
    size = captioner.config.image_size
    images = np.random.default_rng(1).integers(0, 256, (6, size, size, 3), dtype=np.uint8)
    _, cells = captioner.feature_slots(8).encode(images, np.arange(len(images)))
    scenes = captioner.read_scenes(images, cells)
    unrefined = [read_scene(labels, captioner.grid_shape) for labels in cells]
    assert scenes == captioner.object_reader.refine(images, unrefined, captioner.grid_shape)
    assert any(a != b for a, b in zip(scenes, unrefined, strict=True))  # the reader changed some shapes

    beam = DecodeOptions(strategy="beam", beam_size=4, num_captions=4)
    grounded = DecodeOptions(strategy="beam", beam_size=4, num_captions=2, grounded=True)
    for scene, plain, reranked in zip(scenes, captioner.caption(images, beam), captioner.caption(images, grounded)):
        expected = rerank(plain, scene)[:2]
        assert [(c.text, c.agrees_with_scene) for c in reranked] == [(c.text, c.agrees_with_scene) for c in expected]


def test_a_reader_without_a_scene_head_or_of_another_kind_is_refused(tmp_path, tiny_captioner):
    from captioning.captioner import Captioner

    bundle = bundle_with_reader(tmp_path, tiny_captioner.feature_size)
    headless = shutil.copytree(bundle, tmp_path / "headless")
    manifest = verify_bundle(headless)
    del manifest["files"]["scene_head.npz"]
    (headless / "scene_head.npz").unlink()
    (headless / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="no scene head"):
        Captioner.load(headless)
    # Listed by the manifest, so past the checksums: a model that is not a reader, and a file that is no model.
    crops = keras.Input((CROP, CROP, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(crops)
    two_outputs = keras.Model(crops, [keras.layers.Dense(len(SHAPES))(pooled), keras.layers.Dense(len(SHAPES))(pooled)])
    for name, write in (("two-outputs", two_outputs.save), ("not-a-model", lambda path: path.write_bytes(b"PK\0"))):
        replaced = shutil.copytree(bundle, tmp_path / name)
        drop_file(replaced, FILE)
        write(replaced / FILE)
        add_files(replaced, (FILE,))
        with pytest.raises(ArtifactError, match=FILE):
            Captioner.load(replaced)


def test_the_service_reads_grounded_requests_with_the_object_reader(tmp_path, tiny_captioner):
    from fastapi.testclient import TestClient

    from app.images import decode_upload
    from app.main import create_app
    from app.settings import Settings

    bundle = bundle_with_reader(tmp_path, tiny_captioner.feature_size)
    app = create_app(Settings(artifacts_dir=bundle, api_key="k", max_upload_bytes=200_000))
    params = {"strategy": "beam", "beam_size": 3, "num_captions": 3, "grounded": "true"}
    options = DecodeOptions(strategy="beam", beam_size=3, num_captions=3, grounded=True)
    with TestClient(app, headers={"X-API-Key": "k"}) as client:
        captioner = client.app.state.captioner
        assert captioner.object_reader is not None and client.get("/model").json()["object_reader"] is True
        for data in (uploads.png(), uploads.png(colour=(20, 200, 40)), uploads.png(colour=(30, 30, 220))):
            response = client.post("/caption", params=params, files={"image": ("a.png", data, "image/png")})
            assert response.status_code == 200, response.text
            decoded = decode_upload(data, max_pixels=10**7, min_side=1, draft_size=captioner.config.image_size)
            offline = captioner.caption([captioner.prepare(decoded.image)], options)[0]
            answered = response.json()["captions"]
            assert [(c["text"], c["agrees_with_scene"]) for c in answered] == [
                (c.text, c.agrees_with_scene) for c in offline
            ]
        # With the mirror view, the reading is the upload's, not its mirror's.
        data = uploads.png(colour=(200, 40, 40))
        mirrored = client.post("/caption", params={**params, "mirror_view": "true"}, files={"image": ("a.png", data)})
        assert mirrored.status_code == 200, mirrored.text
        decoded = decode_upload(data, max_pixels=10**7, min_side=1, draft_size=captioner.config.image_size)
        both = dataclasses.replace(options, mirror_view=True)
        offline = captioner.caption([captioner.prepare(decoded.image)], both)[0]
        answered = mirrored.json()["captions"]
        assert [(c["text"], c["agrees_with_scene"]) for c in answered] == [
            (c.text, c.agrees_with_scene) for c in offline
        ]


def test_the_encoder_stage_reads_the_grounded_requests_of_a_mixed_batch_from_their_own_uploads(
    tmp_path, tiny_captioner
):
    from app.engine.encoder import encode_requests
    from app.engine.errors import InferenceError
    from app.engine.request import Request
    from app.engine.runner import ModelRunner
    from captioning.captioner import Captioner

    captioner = Captioner.load(bundle_with_reader(tmp_path, tiny_captioner.feature_size))
    size = captioner.config.image_size
    images = np.random.default_rng(4).integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    beam = DecodeOptions(strategy="beam", beam_size=2)
    kinds = [
        DecodeOptions(),
        dataclasses.replace(beam, grounded=True, mirror_view=True),
        DecodeOptions(mirror_view=True),
        dataclasses.replace(beam, grounded=True),
        dataclasses.replace(beam, grounded=True),
    ]
    runner = ModelRunner(captioner, capacity=16)
    requests = [Request(image, options, None, None) for image, options in zip(images, kinds, strict=True)]
    assert encode_requests(runner, requests, 0.0) == (requests, [])
    assert [len(r.feature_slots) for r in requests] == [1, 2, 2, 1, 1]
    _, cells = captioner.feature_slots(8).encode(images, np.arange(len(images)))
    expected = captioner.read_scenes(images, cells)
    for n, request in enumerate(requests):
        assert request.scene == (expected[n] if request.options.grounded else None), n

    # A failing reading fails the grounded requests only, and gives their feature slots back; the
    # plain requests of the batch, which do not need it, keep theirs and go on.
    def fails(images, cells):
        raise RuntimeError("reader out of memory")

    runner.free([slot for request in requests for slot in request.feature_slots])
    runner.read_scenes = fails
    again = [Request(image, options, None, None) for image, options in zip(images, kinds, strict=True)]
    encoded, failed = encode_requests(runner, again, 0.0)
    assert [again.index(request) for request, _ in failed] == [1, 3, 4]  # the grounded ones
    assert encoded == [again[0], again[2]]
    assert all(isinstance(error, InferenceError) and "scene" in str(error) for _, error in failed)
    assert len({id(error) for _, error in failed}) == 3  # an exception object each
    assert [len(r.feature_slots) for r in again] == [1, 0, 2, 0, 0]
    assert len(runner.free_slots) == 16 - 3  # the plain requests' 1 + 2 slots only

    # A failing encode fails every request of the batch and takes no slot.
    runner.free([slot for request in again for slot in request.feature_slots])

    def encode_fails(images):
        raise RuntimeError("encoder out of memory")

    runner.encode = encode_fails
    third = [Request(image, options, None, None) for image, options in zip(images, kinds, strict=True)]
    encoded, failed = encode_requests(runner, third, 0.0)
    assert encoded == [] and [request for request, _ in failed] == third and "encoding" in str(failed[0][1])
    assert len(runner.free_slots) == 16 and all(not r.feature_slots for r in third)


def test_fit_object_reader_adds_a_reader_the_captioner_loads_and_removes_a_stale_calibration(
    tmp_path, tiny_bundle, tiny_captioner
):
    from captioning.calibration import Calibration
    from captioning.captioner import Captioner
    from training.__main__ import main
    from training.fit_object_reader import object_windows

    bundle = bundle_with_scene_head(tmp_path, tiny_captioner.feature_size)
    Calibration(1.0, 0.0, "test").save(bundle / "calibration.json")
    add_files(bundle, ("calibration.json",))
    command = ["fit-object-reader", "--artifacts", str(bundle), "--scenes", "24", "--epochs", "1"]
    assert main(command + ["--data", "small_corner=0.5"]) == 0
    manifest = verify_bundle(bundle)
    assert FILE in manifest["files"] and "calibration.json" not in manifest["files"]
    stage = manifest["stages"]["object_reader"]
    assert stage["fitted_on"].startswith("shapes_wide/train, 24 scenes") and 0 <= stage["val_shape_accuracy"] <= 1
    assert "calibrate" in stage["calibration"]
    assert isinstance(Captioner.load(bundle).object_reader, ObjectReader)

    # The windows it trains on: one per object and copy, each around its object (jitter aside).
    from training.datasets.shapes_wide import load_wide_split

    records = load_wide_split("train", 3, resize_to=32)
    images, boxes, image_of_box, shapes = object_windows(records, 32, None)
    assert images.shape == (3, 32, 32, 3) and len(boxes) == sum(len(r.scene.objects) for r in records)
    assert [SHAPES[s] for s in shapes] == [o.shape for r in records for o in r.scene.objects]
    first = records[0].scene.objects[0]
    width, height = records[0].scene.frame
    centre_x = (boxes[0, 1] + boxes[0, 3]) / 2 * 31 + 0.5
    assert centre_x == pytest.approx(first.cx * 32 / width, abs=1e-4) and image_of_box[0] == 0

    no_head = tmp_path / "no-head"
    shutil.copytree(tiny_bundle, no_head)
    with pytest.raises(ValueError, match="no scene head"):
        main(["fit-object-reader", "--artifacts", str(no_head), "--scenes", "4", "--epochs", "1"])
