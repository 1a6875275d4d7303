"""Artifact bundles: encoder, decoder, vocabulary and config, with a manifest verified before loading.

    bundle/
      encoder.keras  decoder.keras  vocab.json  config.json
      manifest.json   format version, sha256 of every file, creation time, training command,
                      dataset, library versions, evaluation metrics, and the models' known
                      answer on a probe image (captioning.known_answer)

The manifest is checked before any file is parsed, so a truncated or tampered bundle fails with a
clear message instead of a stack trace from deep inside Keras. Models load with safe_mode=True
(no Lambda layers, no arbitrary code).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import platform
from pathlib import Path

from captioning import known_answer
from captioning.grounding import FILE as SCENE_HEAD_FILE
from captioning.grounding import SceneHead
from captioning.known_answer import KEY as KNOWN_ANSWER

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUNDLE_FILES = ("encoder.keras", "decoder.keras", "vocab.json", "config.json")
# Written by later training stages when there is something to fit them on (training/calibrate.py,
# training/fit_domain.py, training/fit_object_reader.py); checksummed like the rest when present.
OBJECT_READER_FILE = "object_reader.keras"  # captioning.object_reader, which imports TensorFlow
OPTIONAL_FILES = ("calibration.json", "domain.npz", SCENE_HEAD_FILE, OBJECT_READER_FILE)


class ArtifactError(RuntimeError):
    """The bundle is missing, incomplete, tampered with, or from an incompatible version."""


def is_bundle(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def scan_versions(model_dir: Path) -> dict[int, Path]:
    """The version directories of a model (`model_artifacts/<name>/<version>/`): integer names (1,
    2, ...; is_version_name); anything else is ignored, so a copy in progress can be staged as e.g.
    `.tmp-3` and renamed into place."""
    if not model_dir.is_dir():
        return {}
    versions: dict[int, Path] = {}
    for entry in sorted(model_dir.iterdir(), key=lambda e: e.name):
        if entry.is_dir() and is_version_name(entry.name):
            number = int(entry.name)
            # "17" and "0017" are one version: the plain name wins, whatever the listing order.
            if number not in versions or entry.name == str(number):
                versions[number] = entry
    return versions


def bundle_path(path: str | Path) -> Path:
    """A bundle, or a model's directory of versions (1/, 2/, ...): then its highest version, as the
    service's default policy (latest:1) picks (a pin or a refused version is the service's business)."""
    path = Path(path)
    versions = {} if is_bundle(path) else scan_versions(path)
    return versions[max(versions)] if versions else path


def is_version_name(name: str) -> bool:
    """ASCII digits (leading zeros allowed, as TF Serving reads "0001"), a positive number of at
    most 18 digits (the APIs cannot address more); not '³', which isdigit() accepts."""
    return name.isascii() and name.isdigit() and int(name) >= 1 and len(name.lstrip("0")) <= 18


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import keras
    import numpy
    import tensorflow

    return {
        "python": platform.python_version(),
        "tensorflow": tensorflow.__version__,
        "keras": keras.__version__,
        "numpy": numpy.__version__,
    }


def write_manifest(
    bundle: str | Path,
    *,
    name: str,
    version: str,
    training: dict,
    metrics: dict | None = None,
    answer: dict | None = None,
) -> dict:
    """Checksums every bundle file and writes manifest.json; returns the manifest. Without a new
    `answer` (the models' known answer, captioning.known_answer) the one already in the bundle's
    manifest is kept: a manifest rewritten over swapped weights still holds the old ones' answer."""
    bundle = Path(bundle)
    if answer is None and (bundle / MANIFEST).is_file():
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            answer = json.loads((bundle / MANIFEST).read_text()).get(KNOWN_ANSWER)
    names = BUNDLE_FILES + tuple(f for f in OPTIONAL_FILES if (bundle / f).is_file())
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {f: {"sha256": sha256_of(bundle / f), "bytes": (bundle / f).stat().st_size} for f in names},
        "training": training,
        "libraries": library_versions(),
        "metrics": metrics or {},
    }
    if answer is not None:
        manifest[KNOWN_ANSWER] = answer
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def bundle_digest(manifest: dict) -> str:
    """One checksum of everything the manifest vouches for (each file's name and sha256): equal for
    the same weights under any name or version, different if any file differs."""
    files = manifest.get("files") or {}
    lines = "".join(f"{name}:{files[name].get('sha256', '')}\n" for name in sorted(files))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def update_metrics(bundle: str | Path, metrics: dict) -> dict:
    """Records evaluation results; the manifest is not among the checksummed files, so this is safe."""
    manifest = verify_bundle(bundle)
    manifest["metrics"] = metrics
    (Path(bundle) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_models(bundle: str | Path):
    """(ModelConfig, encoder, decoder) of a bundle verify_bundle has passed, loaded safely (no
    Lambda layers, no arbitrary code); ArtifactError when a file does not load."""
    import keras

    import captioning.backbones  # noqa: F401  (registers the custom layers for safe loading)
    import captioning.model  # noqa: F401
    from captioning.config import ModelConfig

    bundle = Path(bundle)
    try:
        config = ModelConfig.load(bundle / "config.json")
        encoder = keras.saving.load_model(bundle / "encoder.keras", compile=False, safe_mode=True)
        decoder = keras.saving.load_model(bundle / "decoder.keras", compile=False, safe_mode=True)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{bundle}: could not load the bundle: {exc}") from exc
    return config, encoder, decoder


def record_known_answer(bundle: str | Path) -> dict:
    """Computes the known answer (captioning.known_answer) of a verified bundle's models, as
    trained, and records it in its manifest: for bundles written before there was one. A bundle
    that has one is refused (a new answer would bless whatever files are there now), unless it
    lacks only the scene head's part (bundles saved in round 33): then the models must pass their
    recorded answer first, and the head's part is added."""
    bundle = Path(bundle)
    manifest = verify_bundle(bundle)
    answer = manifest.get(KNOWN_ANSWER)
    has_head = SCENE_HEAD_FILE in manifest["files"]
    if answer is not None and not (has_head and known_answer.SCENE_HEAD not in answer):
        raise ArtifactError(f"{bundle}: the manifest has a known answer already; Captioner.load checks it")
    config, encoder, decoder = load_models(bundle)  # only once the bundle is known to need an answer
    scene_head = _load_scene_head(bundle) if has_head else None
    if answer is None:
        answer = known_answer.compute(
            encoder, decoder, config.image_size, config.max_length, config.vocab_size, scene_head
        )
    else:
        _check_models(bundle, encoder, decoder, config, answer)
        answer[known_answer.SCENE_HEAD] = known_answer.scene_head_answer(encoder, config.image_size, scene_head)
    manifest[KNOWN_ANSWER] = answer
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check_models(bundle: Path, encoder, decoder, config, answer: dict) -> None:
    try:
        known_answer.check(encoder, decoder, config.image_size, answer)
    except known_answer.KnownAnswerMismatch as exc:
        raise ArtifactError(f"{bundle}: {exc}") from None


def add_scene_head(bundle: str | Path, scene_head: SceneHead) -> dict:
    """Adds a scene head trained with this bundle's encoder (one saved before `training train`
    wrote heads itself) as scene_head.npz, with its part of the known answer; returns the manifest.
    The bundle's models must first pass their own known answer, so the head is tied to the encoder
    the manifest vouches for. A bundle that has a head is refused: replacing it would bless a new one."""
    bundle = Path(bundle)
    manifest = verify_bundle(bundle)
    answer = manifest.get(KNOWN_ANSWER)
    if answer is None:
        raise ArtifactError(f"{bundle}: no known answer to add the head's to; run record_known_answer first")
    if SCENE_HEAD_FILE in manifest["files"]:
        raise ArtifactError(f"{bundle}: the bundle has a scene head already")
    config, encoder, decoder = load_models(bundle)
    if scene_head.feature_size != encoder.output.shape[-1]:
        raise ArtifactError(
            f"{bundle}: the head reads features of {scene_head.feature_size} values, the encoder gives "
            f"{encoder.output.shape[-1]}"
        )
    _check_models(bundle, encoder, decoder, config, answer)
    answer[known_answer.SCENE_HEAD] = known_answer.scene_head_answer(encoder, config.image_size, scene_head)
    path = bundle / SCENE_HEAD_FILE
    try:
        scene_head.save(path)
        manifest["files"][SCENE_HEAD_FILE] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
        (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        path.unlink(missing_ok=True)  # an unlisted head would make verify_bundle refuse the whole bundle
        raise
    return manifest


def _load_scene_head(bundle: Path) -> SceneHead:
    try:
        return SceneHead.load(bundle / SCENE_HEAD_FILE)
    except (ValueError, OSError, KeyError) as exc:
        raise ArtifactError(f"{bundle}: could not load the bundle: {exc}") from exc


def add_files(bundle: str | Path, names: tuple[str, ...]) -> dict:
    """Adds (or re-checksums) optional files fitted after training (a calibration, a domain check)
    after verifying the rest; returns the manifest. A scene head joins with add_scene_head."""
    manifest = verify_bundle(bundle, adding=names)
    for name in names:
        if name not in OPTIONAL_FILES:
            raise ValueError(f"{name!r} is not an optional bundle file {OPTIONAL_FILES}")
        if name == SCENE_HEAD_FILE:
            raise ValueError(f"{name} joins a bundle with add_scene_head, which records its known answer")
        path = Path(bundle) / name
        manifest["files"][name] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
    (Path(bundle) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def drop_file(bundle: str | Path, name: str) -> None:
    """Removes an optional file and its manifest entry (a stage about to fit it anew)."""
    if name not in OPTIONAL_FILES:
        raise ValueError(f"{name!r} is not an optional bundle file {OPTIONAL_FILES}")
    manifest_path = Path(bundle) / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest.get("files", {}).pop(name, None)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    (Path(bundle) / name).unlink(missing_ok=True)


def verify_bundle(bundle: str | Path, adding: tuple[str, ...] = ()) -> dict:
    """Returns the manifest if every file is present and matches its checksum; else ArtifactError,
    also for a file that cannot be read (permissions). `adding`: optional files about to be added
    to the manifest (add_files), not yet vouched for."""
    try:
        return _verify_bundle(Path(bundle), adding)
    except OSError as exc:
        raise ArtifactError(f"{bundle}: cannot read the bundle: {exc}") from None


def _verify_bundle(bundle: Path, adding: tuple[str, ...]) -> dict:
    if not bundle.is_dir():
        raise ArtifactError(f"artifacts directory not found: {bundle}")
    manifest_path = bundle / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path} is missing: not an artifact bundle")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON: {exc}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: bundle format version {version!r} is not supported (this code reads version "
            f"{FORMAT_VERSION}); re-export the model with this version of the training module"
        )
    files = manifest.get("files")
    if (
        not isinstance(files, dict)
        or not set(BUNDLE_FILES) <= set(files)
        or not set(files) <= set(BUNDLE_FILES + OPTIONAL_FILES)
    ):
        raise ArtifactError(
            f"{manifest_path}: file list must name {list(BUNDLE_FILES)} and optionally {list(OPTIONAL_FILES)}"
        )
    for name in OPTIONAL_FILES:  # an optional file no checksum vouches for is never read
        if name not in files and name not in adding and (bundle / name).exists():
            raise ArtifactError(f"{bundle / name} is not in the manifest: unverified file in the bundle")
    for name, entry in files.items():
        path = bundle / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing from the bundle")
        size = path.stat().st_size
        if isinstance(entry.get("bytes"), int) and size != entry["bytes"]:  # cheaper than hashing gigabytes
            raise ArtifactError(f"{path} has {size} bytes, the manifest says {entry['bytes']}: changed or incomplete")
        if sha256_of(path) != entry.get("sha256"):
            raise ArtifactError(f"{path} does not match its sha256 in the manifest: the file was changed or corrupted")
    return manifest


def save_bundle(
    bundle: str | Path,
    encoder,
    decoder,
    tokenizer,
    config,
    *,
    name: str,
    version: str,
    training: dict,
    metrics: dict | None = None,
    scene_head=None,
) -> dict:
    """Writes the four bundle files and their manifest; returns the manifest. Optional files
    already in the directory (a calibration, a domain check) were fitted to whatever model was
    written there before: they are removed, never vouched for by the new manifest. scene_head
    (captioning.grounding.SceneHead, trained with this encoder) is written as scene_head.npz."""
    bundle = Path(bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    for optional in OPTIONAL_FILES:
        (bundle / optional).unlink(missing_ok=True)
    encoder.save(bundle / "encoder.keras")
    decoder.save(bundle / "decoder.keras")
    tokenizer.save(bundle / "vocab.json")
    config.save(bundle / "config.json")
    if scene_head is not None:
        scene_head.save(bundle / "scene_head.npz")
    answer = known_answer.compute(encoder, decoder, config.image_size, config.max_length, config.vocab_size, scene_head)
    return write_manifest(bundle, name=name, version=version, training=training, metrics=metrics, answer=answer)
