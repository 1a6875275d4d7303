"""Bundles: round trip, and a clear ArtifactError for anything missing or tampered with."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_bundle

from captioning import known_answer
from captioning.artifacts import (
    ArtifactError,
    add_files,
    bundle_digest,
    record_known_answer,
    save_bundle,
    update_metrics,
    verify_bundle,
    write_manifest,
)
from captioning.captioner import Captioner

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "copy")


def test_round_trip_gives_same_captions(tiny_bundle, tiny_captioner):
    images = list(np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8))
    again = Captioner.load(tiny_bundle)
    first = [c[0] for c in tiny_captioner.caption(images)]
    second = [c[0] for c in again.caption(images)]
    assert [c.tokens for c in first] == [c.tokens for c in second]
    np.testing.assert_allclose([c.log_prob for c in first], [c.log_prob for c in second], rtol=1e-5)


def test_manifest_records_checksums_versions_and_training(tiny_bundle):
    manifest = verify_bundle(tiny_bundle)
    assert manifest["format_version"] == 1
    assert set(manifest["files"]) == {"encoder.keras", "decoder.keras", "vocab.json", "config.json"}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    assert {"tensorflow", "keras", "numpy", "python"} <= set(manifest["libraries"])
    assert manifest["training"]["command"] and manifest["created"]


def test_tampered_file_is_refused(bundle_copy):
    vocab = bundle_copy / "vocab.json"
    vocab.write_text(vocab.read_text().replace("circle", "circlE"))
    with pytest.raises(ArtifactError, match="vocab.json does not match its sha256"):
        Captioner.load(bundle_copy)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "decoder.keras").unlink()
    with pytest.raises(ArtifactError, match="decoder.keras is missing"):
        Captioner.load(bundle_copy)


def test_missing_manifest_and_directory_are_refused(bundle_copy, tmp_path):
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="not an artifact bundle"):
        Captioner.load(bundle_copy)
    with pytest.raises(ArtifactError, match="not found"):
        Captioner.load(tmp_path / "nowhere")


def test_incompatible_version_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 99 is not supported"):
        Captioner.load(bundle_copy)


def test_metrics_update_keeps_bundle_valid(bundle_copy):
    update_metrics(bundle_copy, {"bleu_4": 0.5})
    assert verify_bundle(bundle_copy)["metrics"] == {"bleu_4": 0.5}


def test_a_model_saved_over_another_drops_the_earlier_models_fitted_files(bundle_copy, tiny_captioner):
    # An earlier model's calibration and domain check, as `calibrate` / `fit-domain` leave them.
    (bundle_copy / "calibration.json").write_text('{"temperature": 2.0}')
    (bundle_copy / "domain.npz").write_bytes(b"fitted to other weights")
    add_files(bundle_copy, ("calibration.json", "domain.npz"))
    c = tiny_captioner
    manifest = save_bundle(bundle_copy, c.encoder, c.decoder, c.tokenizer, c.config, name="n", version="2", training={})
    assert set(manifest["files"]) == {"encoder.keras", "decoder.keras", "vocab.json", "config.json"}
    assert not (bundle_copy / "calibration.json").exists() and not (bundle_copy / "domain.npz").exists()
    assert Captioner.load(bundle_copy).calibration is None


def test_a_domain_check_fitted_to_another_encoder_is_refused_at_load(bundle_copy):
    shutil.copy(ROOT / "model_artifacts/default/3/domain.npz", bundle_copy / "domain.npz")  # 512 pooled features
    add_files(bundle_copy, ("domain.npz",))
    with pytest.raises(ArtifactError, match="domain.npz was fitted to an encoder of another width"):
        Captioner.load(bundle_copy)


def test_a_saved_bundle_records_its_known_answer_and_every_precision_passes_it(tiny_bundle):
    answer = verify_bundle(tiny_bundle)[known_answer.KEY]
    assert len(answer["targets"]) == len(answer["log_probs"]) == len(answer["tokens"]) + 1
    for precision in (None, "float32", "bfloat16"):
        Captioner.load(tiny_bundle, encoder_precision=precision)  # raises if the check fails


def test_a_decoder_from_another_model_is_refused_under_a_rewritten_manifest(tmp_path):
    """Two ShapeWorld versions share every shape: their files swap without a Keras error, the
    checksums are rewritten, and every caption would be nonsense."""
    bundle = shutil.copytree(ROOT / "model_artifacts/shapeworld/3", tmp_path / "swapped")
    shutil.copy(ROOT / "model_artifacts/shapeworld/4/decoder.keras", bundle / "decoder.keras")
    write_manifest(bundle, name="swapped", version="3", training={})  # keeps the known answer
    verify_bundle(bundle)  # the checksums alone are content
    with pytest.raises(ArtifactError, match="away from the manifest.s known answer .*not trained together"):
        Captioner.load(bundle, encoder_precision="bfloat16")


def test_a_decoder_for_another_feature_grid_is_refused(bundle_copy, tmp_path):
    other = make_tiny_bundle(tmp_path / "wider", image_size=64)  # an 8x8 grid against the copy's 4x4
    shutil.copy(other / "decoder.keras", bundle_copy / "decoder.keras")
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest[known_answer.KEY]  # so the shape check, not the known answer, must catch it
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    write_manifest(bundle_copy, name="wider", version="1", training={})
    with pytest.raises(ArtifactError, match=r"the decoder takes features \(64, 32\), the encoder gives \(16, 32\)"):
        Captioner.load(bundle_copy)


def test_weights_that_turned_nan_are_refused_and_never_recorded(bundle_copy):
    import keras

    decoder = keras.saving.load_model(bundle_copy / "decoder.keras", compile=False, safe_mode=True)
    kernel, bias = decoder.get_layer("logits").get_weights()
    decoder.get_layer("logits").set_weights([kernel, np.full_like(bias, np.nan)])
    decoder.save(bundle_copy / "decoder.keras")
    write_manifest(bundle_copy, name="nan", version="1", training={})
    with pytest.raises(ArtifactError, match="not finite"):  # NaN compares false with any tolerance
        Captioner.load(bundle_copy)
    config = json.loads((bundle_copy / "config.json").read_text())
    encoder = keras.saving.load_model(bundle_copy / "encoder.keras", compile=False, safe_mode=True)
    with pytest.raises(ValueError, match="not finite"):
        known_answer.compute(encoder, decoder, config["image_size"], config["max_length"], config["vocab_size"])


def test_a_decoder_of_another_vocabulary_or_a_malformed_answer_is_refused(bundle_copy, tmp_path):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    (bundle_copy / "manifest.json").write_text(json.dumps({**manifest, known_answer.KEY: {"tokens": [4]}}))
    with pytest.raises(ArtifactError, match="cannot score the recorded answer"):
        Captioner.load(bundle_copy)
    short = {**manifest[known_answer.KEY], "log_probs": manifest[known_answer.KEY]["log_probs"][:-1]}
    (bundle_copy / "manifest.json").write_text(json.dumps({**manifest, known_answer.KEY: short}))
    with pytest.raises(ArtifactError, match="cannot score the recorded answer"):  # was a bare ValueError
        Captioner.load(bundle_copy)
    other = make_tiny_bundle(tmp_path / "other", captions=["one two three four five six seven eight nine ten"])
    shutil.copy(other / "decoder.keras", bundle_copy / "decoder.keras")
    write_manifest(bundle_copy, name="other", version="1", training={})
    with pytest.raises(ArtifactError, match="the decoder predicts 14 words"):
        Captioner.load(bundle_copy)


def test_a_bundle_without_a_known_answer_loads_and_says_it_is_unchecked(bundle_copy, caplog):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    saved = manifest.pop(known_answer.KEY)
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="captioning.captioner"):
        Captioner.load(bundle_copy)
    assert "records no known answer" in caplog.text
    # record_known_answer adds the answer the bundle was saved with, and never replaces one.
    assert record_known_answer(bundle_copy)[known_answer.KEY] == saved
    with pytest.raises(ArtifactError, match="has a known answer already"):
        record_known_answer(bundle_copy)


def test_a_listed_file_that_does_not_load_is_an_artifact_error_for_either_door(bundle_copy):
    # A manifest rewritten over a file Keras cannot read passes the checksums; loading must still
    # fail as an ArtifactError, from Captioner.load and from record_known_answer.
    (bundle_copy / "decoder.keras").write_bytes(b"not a keras archive")
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest[known_answer.KEY]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    write_manifest(bundle_copy, name="broken", version="1", training={})
    for door in (Captioner.load, record_known_answer):
        with pytest.raises(ArtifactError, match="could not load the bundle"):
            door(bundle_copy)


def test_the_digest_names_the_weights_not_the_label():
    third, second = (verify_bundle(ROOT / "model_artifacts/default" / v) for v in ("3", "2"))
    assert (third["name"], third["version"]) == (second["name"], second["version"])  # one label, two models
    assert bundle_digest(third) != bundle_digest(second)
    assert bundle_digest(third) == bundle_digest({**third, "name": "renamed", "version": "9"})
    assert bundle_digest(third).startswith("sha256:") and len(bundle_digest(third)) == 71
