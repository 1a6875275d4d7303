"""Cached backbone features: run a frozen backbone over the images once, then train from the cache.

A frozen backbone gives the same features for an image every epoch, so recomputing them is wasted
work (most of a step with a large backbone). With a cache, each epoch only runs the encoder's
head (captioning.model.build_encoder_head: grid -> coordinates, flatten, project) and the decoder:

    python -m training extract-features --cache features/ <the train command's flags>
    python -m training train <flags> --features-cache features/   # extracts what is missing, then trains

Layout (plain .npy and JSON files, read with allow_pickle=False; nothing is pickled):

    CACHE/
      file_hashes.json                    image file -> [bytes, mtime_ns, sha256]: files that have not
                                          changed are not read again to hash them
      <backbone>-<size>-<key digest>/     one folder per cache key
        key.json                          what the key stands for (backbone, size, weights digest, ...)
        index.json                        {"shards": [...], "rows": {image sha256: [shard, row]}}
        shard-00000.npy ...               float16 [rows, h, w, C]: the backbone's feature grid

The key is the backbone's name, the image size, its preprocessing, and the sha256 of the
backbone's weight *values*, whatever their source (ImageNet, a weights file, or a seeded random
initialisation). Keying on the values rather than on where they came from means a cache can never
serve features of other weights: at worst it misses and extracts again. Images are keyed by
content (the file's bytes, or the pixels of in-memory images), so the same image under two paths
or in two datasets is extracted once, and an image edited in place is extracted again.

Features are stored as float16 (half the disk and memory); training from them therefore sees the
backbone output rounded to ~3 significant digits, while the saved encoder, run on images at
inference time, computes it in float32. The difference is far below what the caption depends on.

One process writes to a cache at a time; shards and the index are replaced atomically, so an
interrupted extraction keeps every completed shard and the next run carries on from there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from captioning.artifacts import sha256_of
from captioning.backbones import get_backbone
from captioning.config import ModelConfig
from training.config import add_config_flags, build_models, config_from_args, load_records, parse_options
from training.data import AUTOTUNE, image_source
from training.datasets.base import CaptionedImage

# 2: files decoded by the service's path (captioning.preprocess), not tf.io.decode_image: features
# cached by format 1 came from other pixels and must not be reused.
CACHE_FORMAT = 2
SHARD_BYTES = 256 << 20  # rows are written in shards of about this size
MAX_SHARD_ROWS = 8192
FILE_HASHES = "file_hashes.json"


# --- what the model side needs ------------------------------------------------------------------


def backbone_of(encoder: keras.Model) -> keras.Model:
    return next(layer for layer in encoder.layers if isinstance(layer, keras.Model) and layer.name != "encoder_head")


def build_grid_extractor(encoder: keras.Model) -> keras.Model:
    """images -> the backbone's feature grid [B, h, w, C]: the encoder without its head."""
    images = keras.Input(tuple(encoder.input.shape[1:]), name="image")
    pixels = encoder.get_layer("preprocess")(images)
    return keras.Model(images, backbone_of(encoder)(pixels, training=False), name="grid_extractor")


def build_feature_encoder(encoder: keras.Model) -> keras.Model:
    """cached grid [B, h, w, C] -> features [B, N, D]: the encoder's own head model.

    Its weights are the full encoder's, so training it trains the encoder, and saving the encoder
    afterwards writes exactly the trained model (preprocess + backbone + head)."""
    return encoder.get_layer("encoder_head")


def weights_digest(model: keras.Model) -> str:
    """sha256 over the shapes and values of every weight, in the model's (fixed) order."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(repr((value.shape, str(value.dtype))).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def cache_key(config: ModelConfig, encoder: keras.Model) -> dict:
    """Everything the cached features depend on besides the image itself."""
    grid_shape = build_feature_encoder(encoder).input.shape[1:]
    return {
        "format": CACHE_FORMAT,
        "backbone": config.backbone,
        "image_size": config.image_size,
        "preprocessing": get_backbone(config.backbone).preprocessing,
        "weights_sha256": weights_digest(backbone_of(encoder)),
        "feature_shape": [int(size) for size in grid_shape],
        "dtype": "float16",
    }


def key_folder_name(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{key['backbone']}-{key['image_size']}-{digest}"


# --- image content hashes -----------------------------------------------------------------------


def _sha256_pixels(pixels: np.ndarray) -> str:
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(repr((pixels.shape, str(pixels.dtype))).encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


def _file_fingerprint(path: str) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def image_hashes(records: list[CaptionedImage], cache_root: Path, verbose: int = 1) -> list[str]:
    """The content sha256 of every record's image (file bytes, or pixels held in memory). File
    hashes are remembered by (path, size, mtime) in CACHE/file_hashes.json, so later runs only stat
    the files."""
    memo_path = cache_root / FILE_HASHES
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    paths = dict.fromkeys(os.path.abspath(r.path) for r in records if r.path is not None)
    stale = [path for path in paths if memo.get(path, [])[:2] != _file_fingerprint(path)]
    if stale:
        print(f"hashing {len(stale)} image files (remembered in {memo_path})")
        progress = keras.utils.Progbar(len(stale), verbose=verbose, unit_name="file")
        for n, path in enumerate(stale, start=1):
            memo[path] = _file_fingerprint(path) + [sha256_of(path)]
            if n % 256 == 0 or n == len(stale):
                progress.update(n)
        _write_json_atomically(memo_path, memo)
    return [memo[os.path.abspath(r.path)][2] if r.path is not None else _sha256_pixels(r.pixels) for r in records]


def _write_json_atomically(path: Path, data) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    os.replace(temporary, path)


# --- the store for one key ----------------------------------------------------------------------


class FeatureCache:
    """The shards and index of one cache key."""

    def __init__(self, cache_root: str | Path, key: dict):
        self.root = Path(cache_root)
        self.key = key
        self.directory = self.root / key_folder_name(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        key_file = self.directory / "key.json"
        if key_file.is_file():
            stored = json.loads(key_file.read_text())
            if stored != key:
                raise ValueError(f"{key_file} describes other features than its folder name says; remove the folder")
        else:
            key_file.write_text(json.dumps(key, indent=2) + "\n")
        index_file = self.directory / "index.json"
        self.index = json.loads(index_file.read_text()) if index_file.is_file() else {"shards": [], "rows": {}}

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return tuple(self.key["feature_shape"])

    def __contains__(self, image_hash: str) -> bool:
        return image_hash in self.index["rows"]

    def __len__(self) -> int:
        return len(self.index["rows"])

    def write_shard(self, features: np.ndarray, hashes: list[str]) -> None:
        """Adds one shard of rows: the .npy file first, then the index that points into it."""
        if features.shape[1:] != self.feature_shape or len(features) != len(hashes):
            raise ValueError(f"shard of shape {features.shape} does not fit key shape {self.feature_shape}")
        number = len(self.index["shards"])
        name = f"shard-{number:05d}.npy"
        temporary = self.directory / (name + ".tmp")
        with open(temporary, "wb") as f:
            np.save(f, features.astype(np.float16), allow_pickle=False)
        os.replace(temporary, self.directory / name)
        self.index["shards"].append(name)
        for row, image_hash in enumerate(hashes):
            self.index["rows"][image_hash] = [number, row]
        _write_json_atomically(self.directory / "index.json", self.index)

    def open_shards(self) -> list[np.ndarray]:
        """Every shard, memory-mapped: rows are read from disk (or the page cache) when used."""
        return [np.load(self.directory / name, mmap_mode="r", allow_pickle=False) for name in self.index["shards"]]

    def locations(self, hashes: list[str]) -> np.ndarray:
        """[n, 2] int64: (shard, row) of each image."""
        rows = self.index["rows"]
        return np.array([rows[h] for h in hashes], dtype=np.int64).reshape(-1, 2)


class CachedFeatures:
    """The cached features of a list of records, in record order, for training.data.make_dataset."""

    def __init__(self, cache: FeatureCache, hashes: list[str]):
        self.locations = cache.locations(hashes)
        self.shape = cache.feature_shape
        self._shards = cache.open_shards()

    def read(self, location: np.ndarray) -> np.ndarray:
        shard, row = location
        return np.asarray(self._shards[shard][row])

    def load(self, location: tf.Tensor) -> tf.Tensor:
        """A tf.data map function: (shard, row) -> float32 grid [h, w, C]."""
        features = tf.numpy_function(self.read, [location], tf.float16, stateful=False)
        features.set_shape(self.shape)
        return tf.cast(features, tf.float32)


# --- extraction ---------------------------------------------------------------------------------


def extract_missing(
    cache: FeatureCache,
    records: list[CaptionedImage],
    hashes: list[str],
    encoder: keras.Model,
    image_size: int,
    batch_size: int,
    verbose: int = 1,
    label: str = "",
) -> int:
    """Runs the backbone over the images not yet in the cache; returns how many it extracted."""
    pending: dict[str, CaptionedImage] = {}
    for record, image_hash in zip(records, hashes):
        if image_hash not in cache and image_hash not in pending:
            pending[image_hash] = record
    if not pending:
        return 0
    extractor = build_grid_extractor(encoder)
    run_backbone = tf.function(lambda images: extractor(images, training=False), reduce_retracing=True)
    rows_per_shard = int(np.clip(SHARD_BYTES // (np.prod(cache.feature_shape) * 2), 1, MAX_SHARD_ROWS))

    print(f"extracting {cache.key['backbone']} features of {len(pending)} {label}images into {cache.directory}")
    images = image_source(list(pending.values()), image_size).batch(batch_size).prefetch(AUTOTUNE)
    progress = keras.utils.Progbar(len(pending), verbose=verbose, unit_name="image")
    todo_hashes = list(pending)
    written = 0

    def write(block: np.ndarray) -> None:
        nonlocal written
        cache.write_shard(block, todo_hashes[written : written + len(block)])
        written += len(block)

    pieces, buffered_rows, started = [], 0, time.time()
    for batch in images:
        pieces.append(run_backbone(tf.cast(batch, tf.float32)).numpy().astype(np.float16))
        buffered_rows += len(pieces[-1])
        progress.update(written + buffered_rows)
        if buffered_rows >= rows_per_shard:  # write every full shard, keep the rest buffered
            block = np.concatenate(pieces)
            full = len(block) - len(block) % rows_per_shard
            for start in range(0, full, rows_per_shard):
                write(block[start : start + rows_per_shard])
            pieces, buffered_rows = [block[full:]], len(block) - full
    if buffered_rows:
        write(np.concatenate(pieces))
    elapsed = time.time() - started
    print(f"extracted {written} images in {elapsed:.1f} s ({written / max(elapsed, 1e-9):.1f} images/s)")
    return written


def prepare_cached_features(
    cache_root: str | Path,
    config: ModelConfig,
    encoder: keras.Model,
    records_by_split: dict[str, list[CaptionedImage]],
    *,
    batch_size: int,
    verbose: int = 1,
    extract: bool = True,
) -> dict[str, CachedFeatures]:
    """Opens the cache for this encoder, extracts what the records lack (or fails, when `extract`
    is False), and returns each split's CachedFeatures."""
    if config.trainable_backbone:
        raise ValueError(
            "cached features need a frozen backbone: pass --weights (pretrained weights are frozen "
            "by default) or --freeze-backbone"
        )
    if config.weights is None:
        print(
            "warning: the backbone is frozen at its random initial weights; cached features are reused only by "
            "runs with the same --seed, and are rarely useful (use --weights imagenet or a weights file)",
            file=sys.stderr,
        )
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    cache = FeatureCache(cache_root, cache_key(config, encoder))
    all_records = [record for records in records_by_split.values() for record in records]
    all_hashes = image_hashes(all_records, cache_root, verbose)
    hashes_by_split, start = {}, 0
    for split, records in records_by_split.items():
        hashes_by_split[split] = all_hashes[start : start + len(records)]
        start += len(records)
    missing = len({h for h in all_hashes if h not in cache})
    if missing and not extract:
        raise ValueError(
            f"{missing} images are not in the features cache {cache.directory}; "
            "run `python -m training extract-features` with the same flags first"
        )
    extract_missing(
        cache,
        all_records,
        all_hashes,
        encoder,
        config.image_size,
        batch_size,
        verbose,
        label="/".join(records_by_split) + " ",
    )
    print(f"features cache {cache.directory}: {len(cache)} images")
    return {split: CachedFeatures(cache, hashes) for split, hashes in hashes_by_split.items()}


# --- `python -m training extract-features` ------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "extract-features",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="run a frozen backbone over a dataset once and cache the features for training",
        description="Takes the same flags as `train` (the ones that do not concern extraction are ignored), so "
        "a train command plus --cache DIR extracts exactly the features that train "
        "--features-cache DIR will use.",
    )
    p.add_argument("--cache", required=True, help="features cache directory")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to extract")
    p.add_argument("--extract-batch-size", type=int, default=64, help="images per backbone call")
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    keras.utils.set_random_seed(config.seed)  # as in train, so a seeded random backbone matches
    data_options = parse_options(args.data)
    records_by_split = {}
    for split in [s.strip() for s in args.splits.split(",") if s.strip()]:
        options = {**data_options, **parse_options(args.val_data)} if split == "val" else data_options
        records_by_split[split] = load_records(config, split, options)
    model_config, encoder, _ = build_models(config, vocab_size=8)  # the decoder is not used
    try:
        prepare_cached_features(
            args.cache,
            model_config,
            encoder,
            records_by_split,
            batch_size=args.extract_batch_size,
            verbose=args.verbose,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return 0
