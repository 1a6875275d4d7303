"""Training on real-dataset layouts: a COCO-format fixture written on the fly, weights files, the
features cache, and multi-device strategies. No network, no ../shared, a few seconds of training each."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.artifacts import verify_bundle
from captioning.captioner import Captioner
from training import features
from training.__main__ import main
from training.datasets.shapes import make_example
from training.features import backbone_of

REPO = Path(__file__).resolve().parents[2]
SMALL_MODEL = [
    "--attention-dim",
    "16",
    "--embedding-dim",
    "8",
    "--max-length",
    "12",
    "--batch-size",
    "4",
    "--verbose",
    "0",
]


def write_coco_split(root: Path, split: str, count: int, first_index: int) -> Path:
    """`count` shapes images as PNG files plus a COCO captions file listing them; returns the file."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for n in range(count):
        example = make_example("train", first_index + n)
        file_name = f"{split}_{n:03d}.png"
        Image.fromarray(example.pixels).save(images_dir / file_name)
        images.append({"id": first_index + n, "file_name": file_name, "width": 64, "height": 64})
        annotations += [
            {"id": len(annotations) + k, "image_id": first_index + n, "caption": caption}
            for k, caption in enumerate(example.captions)
        ]
    annotations_file = root / f"captions_{split}.json"
    annotations_file.write_text(json.dumps({"images": images, "annotations": annotations}))
    return annotations_file


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    """A train file of 8 images and a val file of 4, sharing the folder root/images."""
    root = tmp_path_factory.mktemp("coco")
    write_coco_split(root, "train", 8, 0)
    write_coco_split(root, "val", 4, 100)
    return root


@pytest.fixture(scope="module")
def coco_flags(coco_root) -> list[str]:
    return [
        "--dataset",
        "coco",
        "--data",
        f"annotations_file={coco_root / 'captions_train.json'}",
        "--data",
        f"images_dir={coco_root / 'images'}",
        "--val-data",
        f"annotations_file={coco_root / 'captions_val.json'}",
    ]


def test_reference_preset_asks_for_a_dataset(tmp_path):
    with pytest.raises(SystemExit, match="names no dataset"):
        main(["train", "--preset", "reference", "--output", str(tmp_path / "b")])


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory, coco_flags):
    """A random MobileNetV3-Small saved to a weights file, its features extracted twice into a cache,
    then a model trained from the cache with --weights pointing at the file."""
    import io
    from contextlib import redirect_stdout

    import keras

    root = tmp_path_factory.mktemp("cached")
    keras.utils.set_random_seed(99)
    source = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(64, 64, 3), include_preprocessing=True
    )
    weights_file = root / "mobilenet.weights.h5"
    source.save_weights(weights_file)
    flags = [
        *coco_flags,
        *SMALL_MODEL,
        "--backbone",
        "mobilenet_v3_small",
        "--image-size",
        "64",
        "--weights",
        str(weights_file),
    ]
    cache, bundle = root / "cache", root / "bundle"
    outputs = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "MAX_SHARD_ROWS", 5)  # 12 images: shards of 5, 5 and 2 rows
        for command in (
            ["extract-features", "--cache", str(cache)],
            ["extract-features", "--cache", str(cache)],
            [
                "train",
                "--features-cache",
                str(cache),
                "--max-steps",
                "2",
                "--output",
                str(bundle),
                "--run-dir",
                str(root / "run"),
            ],
        ):
            with redirect_stdout(io.StringIO()) as printed:
                assert main([command[0], "--preset", "tiny", *flags, *command[1:]]) == 0
            outputs.append(printed.getvalue())
    return dict(source=source, weights_file=weights_file, cache=cache, bundle=bundle, outputs=outputs)


def test_a_weights_file_is_loaded_into_the_backbone(cached_run):
    bundle = cached_run["bundle"]
    config = json.loads((bundle / "config.json").read_text())
    assert config["weights"] == str(cached_run["weights_file"]) and config["trainable_backbone"] is False
    loaded = backbone_of(Captioner.load(bundle).encoder).get_weights()
    saved = cached_run["source"].get_weights()
    assert len(loaded) == len(saved) > 0
    for got, want in zip(loaded, saved):
        np.testing.assert_array_equal(got, want)


def test_features_cache_extracts_once_and_trains(cached_run, coco_root):
    import keras

    from captioning.config import ModelConfig
    from captioning.model import build_encoder
    from training.features import CachedFeatures, FeatureCache, build_feature_encoder, cache_key, key_folder_name

    first, second, training = cached_run["outputs"]
    assert "features of 12 train/val images" in first
    assert "extracting" not in second and "extracting" not in training  # everything was already there
    (key_dir,) = [p for p in cached_run["cache"].iterdir() if p.is_dir()]
    index = json.loads((key_dir / "index.json").read_text())
    assert len(index["rows"]) == 12
    shards = [np.load(key_dir / name, allow_pickle=False) for name in index["shards"]]
    assert [len(shard) for shard in shards] == [5, 5, 2]
    assert shards[0].dtype == np.float16 and shards[0].shape[1:] == (2, 2, 576)  # MobileNetV3-Small at 64x64
    bundle = cached_run["bundle"]
    assert verify_bundle(bundle)["training"]["features_cache"] is True

    # The saved encoder, run on images, computes what training saw: the cached grid through the head.
    captioner = Captioner.load(bundle)
    image_files = [coco_root / "images" / f"train_{n:03d}.png" for n in range(2)]
    pixels = np.stack([np.asarray(Image.open(f)) for f in image_files]).astype(np.float32)
    key = json.loads((key_dir / "key.json").read_text())
    cached = CachedFeatures(
        FeatureCache(cached_run["cache"], key), [hashlib.sha256(f.read_bytes()).hexdigest() for f in image_files]
    )
    cached_grid = np.stack([cached.read(location) for location in cached.locations]).astype(np.float32)
    from_cache = build_feature_encoder(captioner.encoder)(cached_grid).numpy()
    np.testing.assert_allclose(from_cache, captioner.encoder(pixels).numpy(), atol=2e-2, rtol=2e-2)

    # The key follows the image size and the backbone (and the weights, through their digest).
    def key_for(**overrides):
        keras.utils.set_random_seed(1)
        config = ModelConfig(
            **{
                "backbone": "mobilenet_v3_small",
                "image_size": 64,
                "trainable_backbone": False,
                "weights": str(cached_run["weights_file"]),
                **overrides,
            }
        )
        return key_folder_name(cache_key(config, build_encoder(config)))

    assert key_for() == key_dir.name
    assert key_for(image_size=96) != key_dir.name
    assert key_for(weights=None) != key_dir.name
    assert key_for(backbone="small_cnn", weights=None).startswith("small_cnn-64-")


def test_features_cache_refuses_a_trainable_backbone(tmp_path, coco_flags):
    with pytest.raises(SystemExit, match="frozen backbone"):
        main(["extract-features", "--preset", "tiny", "--cache", str(tmp_path / "c"), *coco_flags, *SMALL_MODEL])


def run_python(code: str, *args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """Runs `code` with `args` in a fresh interpreter (its devices and strategies cannot leak into other tests)."""
    environment = {name: value for name, value in os.environ.items() if name != "TF_CONFIG"}
    environment.update(PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0", **(env or {}))
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


MIRRORED_RUN = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from training.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_coco_files_train_on_two_logical_cpus_to_an_evaluated_bundle(tmp_path, coco_flags):
    """The COCO loader, MirroredStrategy over two logical CPU devices, the bundle, the evaluation."""
    bundle, run_dir = tmp_path / "bundle", tmp_path / "run"
    result = run_python(
        MIRRORED_RUN,
        "train",
        "--preset",
        "tiny",
        *coco_flags,
        *SMALL_MODEL,
        "--max-steps",
        "2",
        "--strategy",
        "mirrored",
        "--devices",
        "/cpu:0,/cpu:1",
        "--output",
        str(bundle),
        "--run-dir",
        str(run_dir),
        "--evaluate-split",
        "val",
        "--no-meteor",
    )
    assert "2 replicas (MirroredStrategy), global batch 4 = 2 per replica" in result.stdout

    manifest = verify_bundle(bundle)
    training = manifest["training"]
    assert training["command"].startswith("python -m training train --preset tiny --dataset coco")
    assert training["dataset"]["name"] == "coco" and training["dataset"]["train_images"] == 8
    assert training["replicas"] == 2
    # The loss is per token, as on one device (it starts near ln(vocabulary)); unscaled it would be 2x.
    assert training["history"]["loss"][0] < 1.3 * math.log(manifest_vocabulary(bundle))
    evaluation = manifest["metrics"]["coco/val"]
    assert evaluation["num_images"] == 4 and 0.0 <= evaluation["bleu_4"] <= 1.0
    assert evaluation["reference"]["rounds"] == 5  # the leave-one-out human line came along

    captioner = Captioner.load(bundle)
    (caption,) = captioner.caption([np.zeros((64, 64, 3), np.uint8)])[0]
    assert set(caption.tokens) <= set(captioner.tokenizer.words)


def manifest_vocabulary(bundle: Path) -> int:
    return len(json.loads((bundle / "vocab.json").read_text())["words"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_multiworker_strategy_from_a_single_worker_tf_config():
    tf_config = {"cluster": {"worker": [f"localhost:{free_port()}"]}, "task": {"type": "worker", "index": 0}}
    code = """
import tensorflow as tf
from captioning.model import CaptionTrainingModel
from training.distribute import cluster_size, is_chief, make_strategy, trainer_class
strategy = make_strategy("multiworker")
assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), strategy
assert strategy.num_replicas_in_sync == 1 and is_chief() and cluster_size() == 1
assert trainer_class(strategy) is CaptionTrainingModel
print("ok")
"""
    assert run_python(code, env={"TF_CONFIG": json.dumps(tf_config)}).stdout.strip().endswith("ok")


def test_chief_and_cluster_size_follow_tf_config(monkeypatch):
    from training.distribute import cluster_size, is_chief, make_strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert is_chief() and cluster_size() == 1
    with pytest.raises(ValueError, match="TF_CONFIG"):
        make_strategy("multiworker")
    cluster = {"worker": ["a:1", "b:1"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert not is_chief() and cluster_size() == 2
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": {"chief": ["c:1"], **cluster}, "task": {"type": "worker", "index": 0}})
    )
    assert not is_chief() and cluster_size() == 3


def test_an_image_cut_short_stops_training_with_its_name_in_one_line(tmp_path, capsys):
    good = make_example("train", 0).pixels
    for name in ("0", "1", "2", "3", "v"):
        Image.fromarray(good).save(tmp_path / f"{name}.png")
    whole = (tmp_path / "0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])  # its header reads: not skipped up front
    lines = [f'{{"image": "{i}.png", "caption": "a red circle", "split": "train"}}' for i in range(4)]
    lines += ['{"image": "cut.png", "caption": "a red circle", "split": "train"}']
    lines += ['{"image": "v.png", "caption": "a red circle", "split": "val"}']
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["train", "--preset", "tiny", "--dataset", "list", "--data", f"list_file={tmp_path / 'list.jsonl'}"]
    argv += ["--max-steps", "2", "--output", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"), "--fresh"]
    assert main(argv) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "cut.png: not a readable image" in error and "Traceback" not in error


def test_what_training_warned_about_its_data_is_kept_in_the_manifest_and_served(tmp_path, capsys):
    """Skipped records and a validation split made of training images are printed, recorded in the
    manifest's `training.warnings`, and listed by GET /model's schema, long after the terminal is gone."""
    from app.routes.model import describe_model

    good = make_example("train", 0).pixels
    for name in ("0", "1", "2", "3"):
        Image.fromarray(good).save(tmp_path / f"{name}.png")
    # No split column: without --val-data, validation is the same list.
    lines = [f'{{"image": "{i}.png", "caption": "a red circle"}}' for i in range(4)]
    lines += ['{"image": "gone.png", "caption": "a red circle"}']
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    bundle = tmp_path / "out"
    argv = ["train", "--preset", "tiny", "--dataset", "list", "--data", f"list_file={tmp_path / 'list.jsonl'}"]
    argv += ["--max-steps", "1", "--output", str(bundle), "--run-dir", str(tmp_path / "run"), "--fresh"]
    assert main(argv) == 0
    printed = capsys.readouterr().err
    assert "4 of the 4 validation images are training images" in printed
    assert printed.count("skipped 1 of 5 images whose image file is missing") == 2  # train and val, once each

    warnings = verify_bundle(bundle)["training"]["warnings"]
    assert len(warnings) == 3, warnings
    for split, warning in zip(("train", "val"), warnings):
        assert f"({split}): skipped 1 of 5 images whose image file is missing" in warning and "gone.png" in warning
    assert warnings[2].startswith("4 of the 4 validation images are training images")
    assert describe_model(Captioner.load(bundle)).training_warnings == warnings


def test_mistakes_found_only_after_training_are_refused_before_it(tmp_path, capsys):
    """Three mistakes a user made with their own data: each came after the whole run, or in the
    middle of Keras's restore, as a traceback or as wrong figures in the manifest; each is now
    one line, before any training step.
    - `--evaluate-split test` on a list without a split column (or a COCO file) scored the
      training images and recorded them as the test split's figures;
    - `--output` naming an existing file failed when the bundle was written;
    - resuming an interrupted run whose captions changed (another vocabulary) failed in Keras's
      BackupAndRestore with a traceback."""
    good = make_example("train", 0).pixels
    for name in ("0", "1", "2", "3"):
        Image.fromarray(good).save(tmp_path / f"{name}.png")
    list_file = tmp_path / "list.jsonl"
    list_file.write_text("".join(f'{{"image": "{i}.png", "caption": "a red circle"}}\n' for i in range(4)))
    common = ["train", "--preset", "tiny", "--dataset", "list", "--data", f"list_file={list_file}", *SMALL_MODEL]
    common += ["--max-steps", "1", "--run-dir", str(tmp_path / "run")]

    assert main([*common, "--output", str(tmp_path / "out"), "--evaluate-split", "test"]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "4 of the 4 test images are training images" in error and "--evaluate-data" in error
    assert not (tmp_path / "out").exists()

    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match="--output .*a-file is a file"):
        main([*common, "--output", str(tmp_path / "a-file")])

    assert main([*common, "--output", str(tmp_path / "out")]) == 0
    backup = tmp_path / "run" / "backup"
    backup.mkdir(exist_ok=True)  # an interrupted run leaves its backup (a finished one removes it)
    list_file.write_text(list_file.read_text().replace("red", "crimson"))  # another vocabulary
    with pytest.raises(SystemExit, match="interrupted run of another model.*--fresh"):
        main([*common, "--output", str(tmp_path / "out2")])
    assert main([*common, "--output", str(tmp_path / "out2"), "--fresh"]) == 0
