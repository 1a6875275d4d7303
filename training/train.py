"""`python -m training train`: vocabulary, tf.data pipeline, teacher-forced training, artifact bundle.

Checkpoints resume after an interruption (Keras BackupAndRestore in the run directory), the best
weights by validation loss are kept, and training stops early when validation loss stops improving.

With a frozen backbone, `--features-cache DIR` trains from cached backbone features
(training/features.py): the encoder's head and the decoder train on them, and the saved
encoder is still the full image -> features model. `--strategy mirrored|multiworker` replicates the
model over several devices or machines (training/distribute.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from captioning.artifacts import save_bundle
from captioning.grounding import SceneHead
from captioning.model import masked_accuracy, masked_loss
from captioning.scenes import SCENE_KINDS
from captioning.tokenizer import Tokenizer, standardize
from training.config import TrainConfig, add_config_flags, build_models, config_from_args, load_records, parse_options
from training.data import make_dataset, scene_targets
from training.datasets.errors import DatasetOptionError
from training.distribute import (
    STRATEGIES,
    cluster_size,
    describe,
    distribute_options,
    is_chief,
    make_strategy,
    per_replica_loss,
    trainer_class,
    worker_task,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a captioner and write an artifact bundle",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", required=True, help="artifact bundle directory to write")
    p.add_argument("--run-dir", help="checkpoints and TensorBoard logs; unset: runs/<the preset's name>")
    p.add_argument("--max-steps", type=int, help="stop after this many training steps (quick runs)")
    p.add_argument(
        "--features-cache",
        metavar="DIR",
        help="train from cached backbone features (frozen backbones only), extracting missing ones first",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="default",
        help="mirrored: all GPUs of this machine; multiworker: several machines (TF_CONFIG)",
    )
    p.add_argument("--devices", help="mirrored only: comma-separated devices, e.g. /gpu:0,/gpu:1")
    p.add_argument(
        "--evaluate-split",
        choices=("train", "val", "test"),
        help="evaluate on this split after training and record it in the manifest",
    )
    p.add_argument(
        "--evaluate-data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="loader option for the evaluation split (default: --data, plus --val-data for val)",
    )
    p.add_argument("--evaluate-limit", type=int, help="images to evaluate on")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR in that evaluation (~15 s of Java start-up)")
    p.add_argument("--fresh", action="store_true", help="ignore an interrupted run's backup in --run-dir")
    add_config_flags(p)
    p.set_defaults(func=run)


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of each epoch (training and validation), for history.json."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(round(time.perf_counter() - self.started, 2))


@dataclass
class Data:
    """The records of both splits, the vocabulary built from the training captions, the loader options."""

    train: list
    val: list
    tokenizer: Tokenizer
    train_options: dict
    val_options: dict
    warnings: list[str]  # about the data, printed and kept in the manifest (`training.warnings`)


class _WarningsTo(logging.Handler):
    """Hands the dataset loaders' warnings (skipped records) to `warn`, as the run's own warnings
    are (a handler of its own would otherwise silence logging's fallback, which printed them)."""

    def __init__(self, warn):
        super().__init__(logging.WARNING)
        self.warn = warn

    def emit(self, record: logging.LogRecord) -> None:
        self.warn(record.getMessage())


def load_data(config: TrainConfig, args: argparse.Namespace) -> Data:
    # Generated datasets draw every image first (about 5 minutes for the default preset's 24000).
    print(f"loading {config.dataset} (train_limit {config.train_limit}, val_limit {config.val_limit}) ...", flush=True)
    train_options = parse_options(args.data)
    val_options = {**train_options, **parse_options(args.val_data)}
    warnings: list[str] = []

    def warn(message: str) -> None:  # printed now, and kept for the manifest
        warnings.append(message)
        print(f"warning: {message}", file=sys.stderr)

    handler = _WarningsTo(warn)
    dataset_logger = logging.getLogger("training.datasets")
    dataset_logger.addHandler(handler)
    dataset_logger.propagate = False  # printed once, by warn()
    try:
        train_records = load_records(config, "train", train_options)
        val_records = load_records(config, "val", val_options)
    finally:
        dataset_logger.removeHandler(handler)
        dataset_logger.propagate = True
    tokenizer = Tokenizer.build(
        (c for r in train_records for c in r.captions), max_size=config.vocab_size, min_count=config.min_count
    )
    print(f"train: {len(train_records)} images, val: {len(val_records)} images, vocabulary: {len(tokenizer)} words")
    longest = config.max_length - 2  # <start> and <end> take two of the positions
    cut = sum(len(standardize(c).split()) > longest for r in train_records for c in r.captions)
    if cut:
        warn(
            f"{cut} training captions are longer than {longest} words and are cut to that "
            "(--max-length sets the limit, in tokens with <start> and <end>)"
        )
    trained_on = {image_of(r) for r in train_records}
    seen = sum(image_of(r) in trained_on for r in val_records)
    if seen:
        # A COCO file is one split, and a list without a split column is whatever split is asked:
        # without --val-data both splits are the same file, and "validation" measures memory.
        warn(
            f"{seen} of the {len(val_records)} validation images are training images, so validation "
            "loss, early stopping and --evaluate-split val measure the training set: give the validation "
            "file with --val-data (e.g. --val-data annotations_file=captions_val2014.json)"
        )
    if args.evaluate_split == "test":
        options = {**train_options, **parse_options(args.evaluate_data)}
        check_test_split(config, trained_on, options, args.evaluate_limit, warn)
    return Data(train_records, val_records, tokenizer, train_options, val_options, warnings)


def image_of(record) -> str:
    """What makes two records one image, for telling a split's images from the training ones."""
    return record.path or record.image_id


def check_test_split(config: TrainConfig, trained_on: set, options: dict, limit: int | None, warn) -> None:
    """Before training, the images --evaluate-split test will score: a COCO file, or a list without
    a split column, is whatever split is asked for, so without a test file in --evaluate-data the
    "test" figures recorded in the manifest would be the training set's. Mostly training images:
    refused; a few: warned about, as for validation."""
    from training.datasets.registry import GENERATED_LOADERS, load_dataset

    if config.dataset in GENERATED_LOADERS:  # each split drawn from its own seeds
        return
    test_records = load_dataset(config.dataset, "test", limit=limit, **options)
    seen = sum(image_of(r) in trained_on for r in test_records)
    message = f"{seen} of the {len(test_records)} test images are training images"
    if test_records and seen * 2 > len(test_records):
        raise DatasetOptionError(
            f"--evaluate-split test: {message}, so the test figures would measure the training set: give the test "
            "file with --evaluate-data (e.g. --evaluate-data annotations_file=captions_test.json), or evaluate "
            "later with python -m training evaluate"
        )
    if seen:
        warn(f"{message}: the test figures are not wholly of unseen images")


def cached_features(config: TrainConfig, model_config, encoder, data: Data, args: argparse.Namespace) -> dict:
    """{split: CachedFeatures} when training from a features cache, else {} (train on images)."""
    if not args.features_cache:
        return {}
    from training.features import prepare_cached_features

    try:
        return prepare_cached_features(
            args.features_cache,
            model_config,
            encoder,
            {"train": data.train, "val": data.val},
            batch_size=config.batch_size,
            verbose=args.verbose,
            extract=cluster_size() == 1,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def compile_trainer(strategy, config: TrainConfig, model_config, encoder, decoder, features: dict, total_steps: int):
    """The teacher-forced training model (over the full encoder, or its head when training from features)."""
    with strategy.scope():
        if features:
            from training.features import build_feature_encoder

            trained_encoder = build_feature_encoder(encoder)  # the full encoder's head, weights shared
        else:
            trained_encoder = encoder
        scene_classes = 1 + len(SCENE_KINDS) if config.scene_loss_weight > 0 else 0  # 0: no object
        trainer = trainer_class(strategy)(trained_encoder, decoder, scene_classes, config.scene_loss_weight)
        # Cosine decay to 5% over the planned run: large steps early, fine ones to settle at the end.
        learning_rate = keras.optimizers.schedules.CosineDecay(config.learning_rate, total_steps, alpha=0.05)
        trainer.compile(
            optimizer=keras.optimizers.Adam(
                learning_rate,
                clipnorm=config.clipnorm,
                use_ema=config.ema_momentum > 0,
                ema_momentum=config.ema_momentum,
            ),
            loss=per_replica_loss(masked_loss),
            # With the scene loss in `loss`, the caption loss alone is logged too (as masked_loss).
            metrics=[masked_accuracy, masked_loss] if scene_classes else [masked_accuracy],
        )
        # Build the weights now: BackupAndRestore needs a built model to restore into.
        encoder_input = trained_encoder.input
        trainer(
            (
                tf.zeros((1, *encoder_input.shape[1:]), encoder_input.dtype),
                tf.zeros((1, config.captions_per_image, model_config.max_length - 1), tf.int32),
                *([tf.zeros((1, trained_encoder.output.shape[1]), tf.int32)] if scene_classes else []),
            )
        )
    return trainer


def fit(
    trainer,
    strategy,
    config: TrainConfig,
    model_config,
    data: Data,
    features: dict,
    run_dir: Path,
    args: argparse.Namespace,
) -> tuple[keras.callbacks.History, EpochTimer]:
    """Teacher-forced epochs with resumable backups, the best checkpoint and early stopping."""
    common = dict(
        image_size=model_config.image_size,
        max_length=model_config.max_length,
        batch_size=config.batch_size,
        captions_per_image=config.captions_per_image,
        seed=config.seed,
        options=distribute_options(strategy),
    )
    scenes = {}
    if config.scene_loss_weight > 0:
        try:
            grid = round(trainer.encoder.output.shape[1] ** 0.5)  # the encoder's grid is square
            scenes = {"train": scene_targets(data.train, grid), "val": scene_targets(data.val, grid)}
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    train_ds = make_dataset(
        data.train,
        data.tokenizer,
        shuffle=True,
        features=features.get("train"),
        flip=config.flip,
        scene_labels=scenes.get("train"),
        **common,
    )
    val_ds = make_dataset(
        data.val, data.tokenizer, shuffle=False, features=features.get("val"), scene_labels=scenes.get("val"), **common
    )

    epochs, steps_per_epoch = config.epochs, None
    if args.max_steps:
        steps_per_epoch = min(args.max_steps, batches_per_epoch(config, data))
        epochs = min(epochs, -(-args.max_steps // steps_per_epoch))
        train_ds = train_ds.repeat()
    # A run from cached features trains other weights (no backbone), so it keeps its own backup.
    backup_dir = run_dir / ("backup-features" if features else "backup")
    if args.fresh and backup_dir.exists():
        shutil.rmtree(backup_dir)
    check_backup_matches(backup_dir, config, model_config, data.tokenizer)
    timer = EpochTimer()
    callbacks = [
        timer,
        ResumableBackup(str(backup_dir)),
        keras.callbacks.ModelCheckpoint(
            str(run_dir / "best.weights.h5"), monitor="val_loss", save_best_only=True, save_weights_only=True
        ),
        # It restores the best epoch's weights when training ends, early or not; with an average to
        # keep (ema_momentum), that would throw the average away.
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.patience, restore_best_weights=config.ema_momentum == 0
        ),
        keras.callbacks.TensorBoard(str(run_dir / "logs"), update_freq="epoch"),
    ]
    history = trainer.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks,
        verbose=args.verbose,
        shuffle=False,
    )
    return history, timer


def scene_head_of(trainer) -> SceneHead | None:
    """The trained cell classifier of the scene loss, for the bundle (grounded decoding), or None."""
    if trainer.scene_head is None:
        return None
    return SceneHead(trainer.scene_head.kernel.numpy(), trainer.scene_head.bias.numpy())


def batches_per_epoch(config: TrainConfig, data: Data) -> int:
    return -(-len(data.train) // config.batch_size)


def run_record(
    config: TrainConfig,
    data: Data,
    history,
    timer: EpochTimer,
    started: float,
    strategy,
    features: dict,
    args: argparse.Namespace,
) -> dict:
    """What the bundle's manifest and history.json record about the run."""
    command_line = getattr(args, "command_line", sys.argv[1:])
    return {
        "command": "python -m training " + shlex.join(command_line),
        "preset": args.preset,
        "settings": config.as_dict(),
        "dataset": {
            "name": config.dataset,
            "train_images": len(data.train),
            "val_images": len(data.val),
            "train_captions": sum(len(r.captions) for r in data.train),
        },
        "epochs_run": len(history.history.get("loss", [])),
        "history": {k: [round(float(v), 5) for v in values] for k, values in history.history.items()},
        "epoch_seconds": timer.seconds,
        "seconds": round(time.time() - started, 1),
        "replicas": strategy.num_replicas_in_sync,
        # The two settings round differently, so a run is reproduced only under the same one.
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0",
        "features_cache": bool(features),
        "warnings": data.warnings,
    }


class ResumableBackup(keras.callbacks.BackupAndRestore):
    """Keras's BackupAndRestore, written so that an interruption at any moment leaves a backup the
    next run can resume from: each file is written beside its final name and then renamed over it
    (Keras writes in place, and a run stopped while it wrote, a large share of a short epoch, left a
    cut-off weights file that failed the resume with a traceback). The weights go first, so at
    worst the record names the epoch before them and one epoch is trained again. A backup that
    still cannot be read (one written before this) is refused in one line."""

    def _save_model(self):
        backup = Path(self.backup_dir)
        backup.mkdir(parents=True, exist_ok=True)
        weights, record = Path(self._weights_path), Path(self._training_metadata_path)
        partial = backup / "partial.weights.h5"  # save_weights needs the .weights.h5 suffix
        self.model.save_weights(filepath=str(partial), overwrite=True)
        os.replace(partial, weights)
        partial = record.with_suffix(".partial")
        partial.write_text(json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen}))
        os.replace(partial, record)

    def on_train_begin(self, logs=None):
        try:
            super().on_train_begin(logs)
        except (OSError, ValueError) as error:
            raise SystemExit(
                f"error: the backup in {self.backup_dir} cannot be read ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:120]}); it was probably cut off while being written: pass "
                "--fresh to start over"
            ) from None


def check_backup_matches(backup_dir: Path, config: TrainConfig, model_config, tokenizer: Tokenizer) -> None:
    """A run resumes from its backup (BackupAndRestore) only with the model it was saved from: with
    another vocabulary (the data changed), other model settings, or other trained parts (the scene
    head, the weights' average) Keras fails deep in the restore with a traceback. The backup's model
    is recorded beside it; a mismatch is refused in one line, before the first step. (A backup from
    before this record is not checked.)"""
    import hashlib

    described = {
        "model": model_config.to_dict(),
        "vocabulary_sha256": hashlib.sha256("\n".join(tokenizer.words).encode()).hexdigest(),
        "scene_head": config.scene_loss_weight > 0,
        "weight_average": config.ema_momentum > 0,
    }
    record = backup_dir.parent / f"{backup_dir.name}.model.json"
    if backup_dir.exists() and record.exists() and json.loads(record.read_text()) != described:
        raise SystemExit(
            f"error: {backup_dir} holds an interrupted run of another model (its vocabulary or model settings "
            "differ from this run's, e.g. the captions changed): pass --fresh to start over, or another --run-dir"
        )
    record.write_text(json.dumps(described, indent=1) + "\n")  # each worker has a run directory of its own


def run_dir_for(config: TrainConfig, args: argparse.Namespace) -> Path:
    run_dir = Path(args.run_dir or Path("runs") / config.name)
    if not is_chief():  # other workers keep their checkpoints apart from the chief's
        run_dir = run_dir / "workers" / "{}-{}".format(*worker_task())
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit(f"error: --max-steps must be at least 1, not {args.max_steps}")
    if config.flip and args.features_cache:
        raise SystemExit("error: --flip needs the images; cached features cannot be mirrored (drop one of them)")
    if config.flip and config.scene_loss_weight > 0:
        raise SystemExit("error: --flip and --scene-loss-weight cannot be combined (the scene labels are not mirrored)")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        # Found only when the bundle is written, after the whole training run.
        raise SystemExit(f"error: --output {args.output} is a file; it names the bundle's directory")
    # First, before TensorFlow does anything: multiworker sets up collective ops at start-up.
    strategy = make_strategy(args.strategy, args.devices.split(",") if args.devices else None)
    keras.utils.set_random_seed(config.seed)
    run_dir = run_dir_for(config, args)
    started = time.time()

    data = load_data(config, args)
    print(f"devices: {describe(strategy, config.batch_size)}")
    with strategy.scope():
        model_config, encoder, decoder = build_models(config, len(data.tokenizer))
    features = cached_features(config, model_config, encoder, data, args)
    planned_steps = config.epochs * batches_per_epoch(config, data)
    trainer = compile_trainer(
        strategy,
        config,
        model_config,
        encoder,
        decoder,
        features,
        total_steps=min(args.max_steps or planned_steps, planned_steps),
    )
    history, timer = fit(trainer, strategy, config, model_config, data, features, run_dir, args)

    record = run_record(config, data, history, timer, started, strategy, features, args)
    (run_dir / "history.json").write_text(json.dumps(record, indent=2) + "\n")
    if not is_chief():
        print(f"worker {worker_task()}: done; the chief writes the bundle")
        return 0
    save_bundle(
        args.output,
        encoder,
        decoder,
        data.tokenizer,
        model_config,
        name=config.name,
        version=time.strftime("%Y%m%d"),
        training=record,
        scene_head=scene_head_of(trainer),
    )
    print(f"wrote {args.output} after {record['seconds']} s")

    if args.evaluate_split:
        from training.evaluate import evaluate_bundle

        split = args.evaluate_split
        options = {**(data.val_options if split == "val" else data.train_options), **parse_options(args.evaluate_data)}
        evaluate_bundle(
            args.output,
            config.dataset,
            split,
            options,
            limit=args.evaluate_limit,
            meteor=not args.no_meteor,
            output=run_dir / f"evaluation-{split}.json",
            update_manifest=True,
        )
    return 0
