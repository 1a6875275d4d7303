"""Shared fixtures: a small randomly initialised bundle, so tests need no trained model."""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from captioning.artifacts import bundle_path  # noqa: E402

# The committed default model (`make train-default`): the highest version, as the service serves it.
DEFAULT_BUNDLE = bundle_path(Path(__file__).resolve().parents[1] / "model_artifacts" / "default")

TINY_CONFIG = dict(image_size=32, attention_dim=32, embedding_dim=16, max_length=12)
TINY_CAPTIONS = [
    "a red circle",
    "there is a small blue square",
    "two green crosses and a yellow triangle",
    "a purple diamond is above an orange circle",
]


def make_tiny_bundle(
    path,
    *,
    captions=TINY_CAPTIONS,
    seed=7,
    never_end=False,
    name="tiny-random",
    version="test",
    training=None,
    metrics=None,
    **overrides,
):
    """Writes a random-weight bundle (real format) to `path`; returns the path. The one builder of test
    bundles: `captions` make the vocabulary, `overrides` change TINY_CONFIG, and `never_end` makes <end>
    (and the never-printed <pad> and <start>) very unlikely, so every caption has max_length words."""
    import keras

    from captioning.artifacts import save_bundle
    from captioning.config import ModelConfig
    from captioning.model import build_decoder, build_encoder
    from captioning.tokenizer import END_ID, PAD_ID, START_ID, Tokenizer

    keras.utils.set_random_seed(seed)
    tokenizer = Tokenizer.build(captions)
    config = ModelConfig(vocab_size=len(tokenizer), **{**TINY_CONFIG, **overrides})
    encoder = build_encoder(config)
    decoder = build_decoder(config, encoder.output.shape[1])
    if never_end:
        logits = decoder.get_layer("logits")
        kernel, bias = logits.get_weights()
        bias[[END_ID, PAD_ID, START_ID]] = -30.0
        logits.set_weights([kernel, bias])
    if training is None:
        training = {"command": "tests/conftest.py", "dataset": {"name": "none", "size": 0}}
    save_bundle(
        path, encoder, decoder, tokenizer, config, name=name, version=version, training=training, metrics=metrics
    )
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def tiny_captioner(tiny_bundle):
    from captioning.captioner import Captioner

    return Captioner.load(tiny_bundle)


@pytest.fixture(scope="session")
def input_feeding_captioner(tmp_path_factory):
    """The tiny bundle's design with input feeding: its decoder state is [GRU state, context]."""
    from captioning.captioner import Captioner

    return Captioner.load(make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "fed", input_feeding=True))
