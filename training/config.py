"""TrainConfig: every value that decides a training run's data and model, typed, from a preset plus flags.

`train` and `extract-features` take the same flags (`add_config_flags`), so a features cache extracted
with a train command's flags holds exactly the features that run will use.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from captioning.backbones import get_backbone
from captioning.config import ModelConfig
from captioning.model import build_decoder, build_encoder
from captioning.tokenizer import SPECIAL_TOKENS
from training.datasets.registry import LOADERS, RESIZING_LOADERS, load_dataset, read_boolean
from training.presets import PRESETS


@dataclass(frozen=True)
class TrainConfig:
    """A training run's settings. Presets (training/presets.py) fill it; command-line flags override them."""

    dataset: str | None = None
    backbone: str = "small_cnn"
    # None: random initialisation; "imagenet", a weights file, or a model bundle of this project
    # (model_artifacts/<name>/<version>): its verified encoder's backbone, the same backbone at the same size
    weights: str | None = None
    trainable_backbone: bool | None = None  # None: train it exactly when it starts from random weights
    image_size: int = 64
    attention_dim: int = 256
    embedding_dim: int = 128
    attention: str = "luong"
    dropout: float = 0.0
    input_feeding: bool = False
    vocab_size: int = 1000
    min_count: int = 1
    max_length: int = 24
    batch_size: int = 32
    captions_per_image: int = 5
    flip: bool = False  # random horizontal flips, with "left" and "right" swapped in the captions
    scene_loss_weight: float = (
        0.0  # > 0: the encoder also learns to name the object at each grid cell (CaptionTrainingModel)
    )
    epochs: int = 12
    learning_rate: float = 2e-3
    # > 0: the saved weights are an exponential moving average of the trained ones, with this momentum
    # per step (Keras's Adam use_ema; the average replaces the weights when fit ends).
    ema_momentum: float = 0.0
    clipnorm: float = 5.0
    patience: int = 3
    train_limit: int | None = None
    val_limit: int | None = None
    seed: int = 1234
    name: str = "captioner"

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """Values no run can use, named as their flags: each used to fail deep in Keras with a
        traceback (--epochs 0, --batch-size 0) or to train nonsense quietly (--learning-rate -1,
        --vocab-size 2: every word <unk>)."""
        at_least = {
            "epochs": 1, "batch_size": 1, "captions_per_image": 1, "attention_dim": 1, "embedding_dim": 1,
            "min_count": 1, "patience": 0, "image_size": 8, "max_length": 3,  # <start>, a word, <end>
            "vocab_size": len(SPECIAL_TOKENS) + 1,  # the special tokens and a word
        }  # fmt: skip
        problems = [
            f"--{name.replace('_', '-')} must be at least {least}, not {getattr(self, name)}"
            for name, least in at_least.items()
            if getattr(self, name) < least
        ]
        problems += [
            f"--{name.replace('_', '-')} must be at least 0, not {getattr(self, name)}"
            for name in ("train_limit", "val_limit")
            if getattr(self, name) is not None and getattr(self, name) < 0
        ]
        for name in ("learning_rate", "clipnorm"):
            if not getattr(self, name) > 0:
                problems.append(f"--{name.replace('_', '-')} must be above 0, not {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout must be in [0, 1), not {self.dropout}")
        if not 0 <= self.ema_momentum < 1:
            problems.append(f"--ema-momentum must be in [0, 1) (0: off), not {self.ema_momentum}")
        if not self.scene_loss_weight >= 0:
            problems.append(f"--scene-loss-weight must be at least 0, not {self.scene_loss_weight}")
        if self.attention not in ("luong", "bahdanau"):
            problems.append(f"--attention must be luong or bahdanau, not {self.attention!r}")
        try:
            get_backbone(self.backbone)
        except ValueError as error:
            problems.append(f"--backbone: {error}")
        return problems

    def limit(self, split: str) -> int | None:
        return {"train": self.train_limit, "val": self.val_limit}.get(split)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            backbone=self.backbone,
            weights=self.weights,
            trainable_backbone=bool(self.trainable_backbone),
            image_size=self.image_size,
            attention_dim=self.attention_dim,
            embedding_dim=self.embedding_dim,
            attention=self.attention,
            vocab_size=vocab_size,
            max_length=self.max_length,
            dropout=self.dropout,
            input_feeding=self.input_feeding,
        )


def _boolean(value: str) -> bool:
    try:
        return read_boolean(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _flag_type(field: dataclasses.Field):
    """The argparse type of a field, from its annotation ("int | None" -> int)."""
    annotation = str(field.type).split("|")[0].strip()
    return {"int": int, "float": float, "str": str, "bool": _boolean}[annotation]


# Flags a preset's values can be overridden with; None on the command line means "take the preset's value".
TUNABLE = [f for f in dataclasses.fields(TrainConfig) if f.name != "trainable_backbone"]


def add_data_flags(p, help: str, val_data: bool = False) -> None:
    """--data KEY=VALUE, repeatable (read by parse_options); with val_data, --val-data for the
    validation split only. `p`: a parser or an argument group."""
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE", help=help)
    if val_data:
        p.add_argument(
            "--val-data",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="loader option for the validation split only (e.g. COCO's val annotations file)",
        )


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """The flags that decide the data and the model (shared by `train` and `extract-features`)."""
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="default: the committed default model's recipe (24000 generated images at 96 px, 8 epochs: about "
        "40 minutes on 2 cores); tiny: a one-minute smoke test; reference: InceptionResNetV2 for COCO-style data "
        "(needs --dataset); shapeworld: the ShapeWorld benchmark (training/presets.py)",
    )
    add_data_flags(p, "dataset loader option, e.g. annotations_file=... (see training/datasets/registry.py)", True)
    p.add_argument("--freeze-backbone", action="store_true", help="do not train the backbone")
    p.add_argument(
        "--train-backbone",
        action="store_true",
        help="fine-tune the backbone (the default only for backbones trained from scratch)",
    )
    p.add_argument(
        "--verbose",
        type=int,
        default=1 if sys.stdout.isatty() else 2,
        help="progress display: 1 progress bars, 2 one line per epoch, 0 silent",
    )
    for field in TUNABLE:
        p.add_argument(
            "--" + field.name.replace("_", "-"),
            type=_flag_type(field),
            default=None,
            help=f"overrides the preset's {field.name} (TrainConfig in training/config.py says what it is)",
        )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset, then TrainConfig's defaults for what it leaves out, then explicit flags."""
    values = dict(PRESETS[args.preset])
    values.update({f.name: getattr(args, f.name) for f in TUNABLE if getattr(args, f.name) is not None})
    if values.get("weights") in ("none", ""):
        values["weights"] = None
    if args.freeze_backbone and args.train_backbone:
        raise SystemExit("--freeze-backbone and --train-backbone contradict each other")
    if args.freeze_backbone or args.train_backbone:
        values["trainable_backbone"] = bool(args.train_backbone)
    try:
        config = TrainConfig(**values)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if config.trainable_backbone is None:  # pretrained: freeze by default
        config = dataclasses.replace(config, trainable_backbone=config.weights is None)
    if not config.dataset:
        raise SystemExit(
            f"preset {args.preset!r} names no dataset: pass --dataset ({', '.join(sorted(LOADERS))}) "
            "and its --data options"
        )
    return config


def parse_options(pairs: list[str]) -> dict[str, str]:
    """`--data KEY=VALUE` pairs as loader keyword arguments."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"dataset option {pair!r} is not KEY=VALUE")
        options[key.replace("-", "_")] = value
    return options


def load_records(config: TrainConfig, split: str, options: dict):
    if config.dataset in RESIZING_LOADERS:  # generated at any size: keep them at the input size
        options = {"resize_to": config.image_size, **options}
    records = load_dataset(config.dataset, split, limit=config.limit(split), **options)
    if not records:
        raise SystemExit(f"dataset {config.dataset!r} has no usable {split} records")
    return records


def backbone_layer(encoder):
    """The backbone inside an encoder of captioning.model.build_encoder: its one nested model but the head."""
    (backbone,) = [layer for layer in encoder.layers if hasattr(layer, "layers") and layer.name != "encoder_head"]
    return backbone


def backbone_of_bundle(bundle: Path, model_config) -> list:
    """The backbone weights of another model of this project, to start a run from (transfer): the
    bundle is verified first, and its backbone must be this run's, at this run's image size."""
    from captioning.artifacts import ArtifactError, load_models, verify_bundle

    try:
        verify_bundle(bundle)
        source, encoder, _ = load_models(bundle)
    except ArtifactError as error:
        raise SystemExit(f"error: --weights {bundle}: {error}") from None
    if (source.backbone, source.image_size) != (model_config.backbone, model_config.image_size):
        raise SystemExit(
            f"error: --weights {bundle} holds a {source.backbone} at {source.image_size} px; this run builds a "
            f"{model_config.backbone} at {model_config.image_size} px (--backbone, --image-size)"
        )
    return backbone_layer(encoder).get_weights()


def build_models(config: TrainConfig, vocab_size: int):
    """(ModelConfig, encoder, decoder) for a run; exits with advice when ImageNet weights cannot be had."""
    model_config = config.model_config(vocab_size)  # the backbone's name was checked by TrainConfig
    if model_config.weights not in (None, "imagenet") and not Path(model_config.weights).exists():
        raise SystemExit(
            f"error: --weights {model_config.weights}: no such weights file or model bundle (a relative path is "
            f"from the current directory, {Path.cwd()}; a preset's, such as shapeworld's, from the repository's root)"
        )
    if model_config.weights is not None and Path(model_config.weights).is_dir():
        transferred = backbone_of_bundle(Path(model_config.weights), model_config)
        encoder = build_encoder(dataclasses.replace(model_config, weights=None))
        backbone_layer(encoder).set_weights(transferred)
    else:
        try:
            encoder = build_encoder(model_config)
        except Exception as error:
            if model_config.weights != "imagenet":
                raise
            raise SystemExit(
                f"could not get the ImageNet weights of {model_config.backbone} ({error}). Keras downloads them "
                "once into ~/.keras/models/; on an offline machine copy that file there from one that is online, "
                "or pass --weights PATH to a weights file"
            ) from error
    decoder = build_decoder(model_config, encoder.output.shape[1])
    return model_config, encoder, decoder
