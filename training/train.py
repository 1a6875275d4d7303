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
import shlex
import sys
import time
from pathlib import Path

import keras
import tensorflow as tf

from captioning.artifacts import save_bundle
from captioning.backbones import get_backbone
from captioning.config import ModelConfig
from captioning.model import build_decoder, build_encoder, masked_accuracy, masked_loss
from captioning.tokenizer import Tokenizer
from training.data import make_dataset
from training.datasets.registry import LOADERS, RESIZING_LOADERS, load_dataset
from training.distribute import (
    STRATEGIES, cluster_size, describe, distribute_options, is_chief, make_strategy, per_replica_loss, trainer_class,
    worker_task,
)
from training.presets import PRESETS

# Flags a preset may set; None on the command line means "take the preset's value".
TUNABLE = dict(
    dataset=str, backbone=str, weights=str, image_size=int, attention_dim=int, embedding_dim=int,
    attention=str, vocab_size=int, min_count=int, max_length=int, batch_size=int, epochs=int,
    learning_rate=float, patience=int, train_limit=int, val_limit=int, name=str, captions_per_image=int,
    clipnorm=float, seed=int, dropout=float,
)
FALLBACKS = dict(captions_per_image=5, clipnorm=5.0, seed=1234, dropout=0.0, weights=None,
                 trainable_backbone=None, train_limit=None, val_limit=None, name="captioner")


def add_settings_flags(p: argparse.ArgumentParser) -> None:
    """The flags that decide the data and the model (shared with `extract-features`)."""
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset loader option, e.g. annotations_file=... (see training/datasets/registry.py)")
    p.add_argument("--val-data", action="append", default=[], metavar="KEY=VALUE",
                   help="loader option for the validation split only (e.g. COCO's val annotations file)")
    p.add_argument("--freeze-backbone", action="store_true", help="do not train the backbone")
    p.add_argument("--train-backbone", action="store_true",
                   help="fine-tune the backbone (the default only for backbones trained from scratch)")
    p.add_argument("--verbose", type=int, default=1 if sys.stdout.isatty() else 2,
                   help="progress display: 1 progress bars, 2 one line per epoch, 0 silent")
    for flag, kind in TUNABLE.items():
        p.add_argument("--" + flag.replace("_", "-"), type=kind, default=None)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a captioner and write an artifact bundle",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="artifact bundle directory to write")
    p.add_argument("--run-dir", help="checkpoints and TensorBoard logs (default: runs/<name>)")
    p.add_argument("--max-steps", type=int, help="stop after this many training steps (quick runs)")
    p.add_argument("--features-cache", metavar="DIR",
                   help="train from cached backbone features (frozen backbones only), extracting missing ones first")
    p.add_argument("--strategy", choices=STRATEGIES, default="default",
                   help="mirrored: all GPUs of this machine; multiworker: several machines (TF_CONFIG)")
    p.add_argument("--devices", help="mirrored only: comma-separated devices, e.g. /gpu:0,/gpu:1")
    p.add_argument("--evaluate-split", choices=("train", "val", "test"),
                   help="evaluate on this split after training and record it in the manifest")
    p.add_argument("--evaluate-data", action="append", default=[], metavar="KEY=VALUE",
                   help="loader option for the evaluation split (default: --data, plus --val-data for val)")
    p.add_argument("--evaluate-limit", type=int, help="images to evaluate on")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR in that evaluation (~15 s of Java start-up)")
    p.add_argument("--fresh", action="store_true", help="ignore an interrupted run's backup in --run-dir")
    add_settings_flags(p)
    p.set_defaults(func=run)


def parse_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"dataset option {pair!r} is not KEY=VALUE")
        options[key.replace("-", "_")] = value
    return options


def resolve_settings(args: argparse.Namespace) -> dict:
    """The preset, then FALLBACKS for what it leaves out, then explicit flags."""
    settings = {**FALLBACKS, **PRESETS[args.preset]}
    settings.update({k: getattr(args, k) for k in TUNABLE if getattr(args, k) is not None})
    if settings["weights"] in ("none", ""):
        settings["weights"] = None
    if args.freeze_backbone and args.train_backbone:
        raise SystemExit("--freeze-backbone and --train-backbone contradict each other")
    if args.freeze_backbone or args.train_backbone:
        settings["trainable_backbone"] = bool(args.train_backbone)
    if settings["trainable_backbone"] is None:
        settings["trainable_backbone"] = settings["weights"] is None  # pretrained: freeze by default
    if not settings.get("dataset"):
        raise SystemExit(f"preset {args.preset!r} names no dataset: pass --dataset ({', '.join(sorted(LOADERS))}) "
                         "and its --data options")
    return settings


def load_records(settings: dict, split: str, options: dict, limit: int | None):
    if settings["dataset"] in RESIZING_LOADERS:  # generated at any size: keep them at the input size
        options = {"resize_to": settings["image_size"], **options}
    records = load_dataset(settings["dataset"], split, limit=limit, **options)
    if not records:
        raise SystemExit(f"dataset {settings['dataset']!r} has no usable {split} records")
    return records


def build_models(settings: dict, vocab_size: int):
    config = ModelConfig(
        backbone=settings["backbone"], weights=settings["weights"], trainable_backbone=settings["trainable_backbone"],
        image_size=settings["image_size"], attention_dim=settings["attention_dim"],
        embedding_dim=settings["embedding_dim"], attention=settings["attention"], vocab_size=vocab_size,
        max_length=settings["max_length"], dropout=settings["dropout"],
    )
    get_backbone(config.backbone)  # fail early on a bad name
    try:
        encoder = build_encoder(config)
    except Exception as error:
        if config.weights != "imagenet":
            raise
        raise SystemExit(
            f"could not get the ImageNet weights of {config.backbone} ({error}). Keras downloads them once into "
            "~/.keras/models/; on an offline machine copy that file there from one that is online, or pass "
            "--weights PATH to a weights file") from error
    decoder = build_decoder(config, encoder.output.shape[1])
    return config, encoder, decoder


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of each epoch (training and validation), for history.json."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(round(time.perf_counter() - self.started, 2))


def run(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    # First, before TensorFlow does anything: multiworker sets up collective ops at start-up.
    strategy = make_strategy(args.strategy, args.devices.split(",") if args.devices else None)
    keras.utils.set_random_seed(settings["seed"])
    chief = is_chief()
    run_dir = Path(args.run_dir or Path("runs") / settings["name"])
    if not chief:  # other workers keep their checkpoints apart from the chief's
        run_dir = run_dir / "workers" / "{}-{}".format(*worker_task())
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    data_options = parse_options(args.data)
    val_options = {**data_options, **parse_options(args.val_data)}
    train_records = load_records(settings, "train", data_options, settings["train_limit"])
    val_records = load_records(settings, "val", val_options, settings["val_limit"])
    tokenizer = Tokenizer.build((c for r in train_records for c in r.captions),
                                max_size=settings["vocab_size"], min_count=settings["min_count"])
    print(f"train: {len(train_records)} images, val: {len(val_records)} images, vocabulary: {len(tokenizer)} words")
    print(f"devices: {describe(strategy, settings['batch_size'])}")

    with strategy.scope():
        config, encoder, decoder = build_models(settings, len(tokenizer))
    features = {}
    if args.features_cache:
        from training.features import prepare_cached_features

        try:
            features = prepare_cached_features(
                args.features_cache, config, encoder, {"train": train_records, "val": val_records},
                batch_size=settings["batch_size"], verbose=args.verbose, extract=cluster_size() == 1)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None

    batches_per_epoch = -(-len(train_records) // settings["batch_size"])
    total_steps = min(args.max_steps or settings["epochs"] * batches_per_epoch, settings["epochs"] * batches_per_epoch)
    with strategy.scope():
        if features:
            from training.features import build_feature_encoder

            trained_encoder = build_feature_encoder(encoder)  # the full encoder's head, weights shared
        else:
            trained_encoder = encoder
        trainer = trainer_class(strategy)(trained_encoder, decoder)
        # Cosine decay to 5% over the planned run: large steps early, fine ones to settle at the end.
        learning_rate = keras.optimizers.schedules.CosineDecay(settings["learning_rate"], total_steps, alpha=0.05)
        trainer.compile(
            optimizer=keras.optimizers.Adam(learning_rate, clipnorm=settings["clipnorm"]),
            loss=per_replica_loss(masked_loss), metrics=[masked_accuracy],
        )
        # Build the weights now: BackupAndRestore needs a built model to restore into.
        encoder_input = trained_encoder.input
        trainer((tf.zeros((1, *encoder_input.shape[1:]), encoder_input.dtype),
                 tf.zeros((1, settings["captions_per_image"], config.max_length - 1), tf.int32)))
    common = dict(image_size=config.image_size, max_length=config.max_length,
                  batch_size=settings["batch_size"], captions_per_image=settings["captions_per_image"],
                  seed=settings["seed"], options=distribute_options(strategy))
    train_ds = make_dataset(train_records, tokenizer, shuffle=True, features=features.get("train"), **common)
    val_ds = make_dataset(val_records, tokenizer, shuffle=False, features=features.get("val"), **common)

    epochs, steps_per_epoch = settings["epochs"], None
    if args.max_steps:
        steps_per_epoch = min(args.max_steps, batches_per_epoch)
        epochs = min(epochs, -(-args.max_steps // steps_per_epoch))
        train_ds = train_ds.repeat()
    # A run from cached features trains other weights (no backbone), so it keeps its own backup.
    backup_dir = run_dir / ("backup-features" if features else "backup")
    if args.fresh and backup_dir.exists():
        import shutil

        shutil.rmtree(backup_dir)
    timer = EpochTimer()
    callbacks = [
        timer,
        keras.callbacks.BackupAndRestore(str(backup_dir)),
        keras.callbacks.ModelCheckpoint(str(run_dir / "best.weights.h5"), monitor="val_loss",
                                        save_best_only=True, save_weights_only=True),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings["patience"], restore_best_weights=True),
        keras.callbacks.TensorBoard(str(run_dir / "logs"), update_freq="epoch"),
    ]
    history = trainer.fit(train_ds, validation_data=val_ds, epochs=epochs, steps_per_epoch=steps_per_epoch,
                          callbacks=callbacks, verbose=args.verbose, shuffle=False)
    epoch_losses = {k: [round(float(v), 5) for v in values] for k, values in history.history.items()}
    command_line = getattr(args, "command_line", sys.argv[1:])
    training_info = {
        "command": "python -m training " + shlex.join(command_line),
        "preset": args.preset,
        "settings": settings,
        "dataset": {"name": settings["dataset"], "train_images": len(train_records),
                    "val_images": len(val_records),
                    "train_captions": sum(len(r.captions) for r in train_records)},
        "epochs_run": len(history.history.get("loss", [])),
        "history": epoch_losses,
        "epoch_seconds": timer.seconds,
        "seconds": round(time.time() - started, 1),
        "replicas": strategy.num_replicas_in_sync,
        "features_cache": bool(features),
    }
    (run_dir / "history.json").write_text(json.dumps(training_info, indent=2) + "\n")
    if not chief:
        print(f"worker {worker_task()}: done; the chief writes the bundle")
        return 0
    save_bundle(args.output, encoder, decoder, tokenizer, config, name=settings["name"],
                version=time.strftime("%Y%m%d"), training=training_info)
    print(f"wrote {args.output} after {training_info['seconds']} s")

    if args.evaluate_split:
        from training.evaluate import evaluate_bundle

        split = args.evaluate_split
        options = {**(val_options if split == "val" else data_options), **parse_options(args.evaluate_data)}
        evaluate_bundle(args.output, settings["dataset"], split, options, limit=args.evaluate_limit,
                        meteor=not args.no_meteor, output=run_dir / f"evaluation-{split}.json",
                        update_manifest=True)
    return 0
