"""The model repository: version policy, hot reload beside the serving version, in-flight requests
finishing on the version they started on, refusal of broken versions, rollback by pin, unloading."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import shutil
import time
import weakref

import numpy as np
import pytest

from app import metrics
from app.model_repository import ModelManager, NoServableVersion, Source, VersionPolicy, precheck, scan_versions
from app.settings import Settings
from captioning import artifacts
from captioning.artifacts import ArtifactError, write_manifest
from captioning.decoding import DecodeOptions


def test_version_policy_parses_and_selects_like_tf_serving():
    assert VersionPolicy.parse("latest:2").select([1, 3, 2]) == [3, 2]
    assert VersionPolicy.parse("specific:1, 3").select([1, 2, 3]) == [3, 1]
    assert VersionPolicy.parse("specific:5").select([1, 2]) == []
    assert VersionPolicy.parse("all").select([2, 1]) == [2, 1]
    assert str(VersionPolicy.parse(" specific:3,1 ")) == "specific:1,3"
    # Not ASCII digits: int() takes '\u0667' (an Arabic-Indic 7) and '+7', MODEL_VERSION_POLICY did not.
    for bad in ("latest:0", "latest", "specific:", "specific:a", "newest:1", "all:2", "specific:\u0667", "latest:+7"):
        with pytest.raises(ValueError):
            VersionPolicy.parse(bad)


def test_settings_refuse_a_malformed_policy():
    with pytest.raises(ValueError):
        Settings(model_version_policy="latest:zero")


def test_only_integer_directories_are_versions(tmp_path, tiny_bundle):
    model = tmp_path / "default"
    for name in ("1", "10", ".tmp-3", "latest", "0", "0017", "017", "17", "0004", "3\u00b3", "1" * 19, "9" * 18):
        (model / name).mkdir(parents=True)
    versions = scan_versions(model)
    assert sorted(versions) == [1, 4, 10, 17, int("9" * 18)]
    assert (versions[4].name, versions[17].name) == ("0004", "17")  # of 17, 017 and 0017: the plain name


def test_artifacts_dir_keeps_serving_one_bundle_or_one_model_directory(tmp_path, tiny_bundle):
    single = Source.from_settings(Settings(artifacts_dir=tiny_bundle))
    assert single.bundle == tiny_bundle and not single.reloadable and single.versions() == {1: tiny_bundle}
    shutil.copytree(tiny_bundle, tmp_path / "shapes" / "4")
    directory = Source.from_settings(Settings(artifacts_dir=tmp_path / "shapes"))
    assert directory.name == "shapes" and directory.reloadable and list(directory.versions()) == [4]


def test_precheck_names_the_problem_without_tensorflow(tmp_path, tiny_bundle):
    with pytest.raises(ArtifactError, match="no model versions"):
        precheck(Settings(model_repository=tmp_path))
    corrupt = tmp_path / "default" / "1"
    shutil.copytree(tiny_bundle, corrupt)
    (corrupt / "decoder.keras").write_bytes(b"truncated")
    with pytest.raises(ArtifactError, match="decoder.keras has 9 bytes, the manifest says"):
        precheck(Settings(model_repository=tmp_path))
    shutil.copytree(tiny_bundle, tmp_path / "default" / "2")
    assert precheck(Settings(model_repository=tmp_path)) == [2]


def test_an_unreadable_version_is_refused_and_the_others_still_start(tmp_path, tiny_bundle, monkeypatch):
    for version in (1, 2):
        shutil.copytree(tiny_bundle, tmp_path / "default" / str(version))
    real = artifacts.sha256_of

    def sha256_of(path):  # as for a file the service's user may not read (chmod 000, another owner)
        if "/2/" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(artifacts, "sha256_of", sha256_of)
    with pytest.raises(ArtifactError, match="cannot read the bundle: .*Permission denied"):
        artifacts.verify_bundle(tmp_path / "default" / "2")
    assert precheck(Settings(model_repository=tmp_path)) == [1]  # it used to raise PermissionError


def test_precheck_hashes_only_the_versions_the_policy_could_serve(tmp_path, tiny_bundle, monkeypatch):
    from app import model_repository

    for version in (1, 2, 3):
        shutil.copytree(tiny_bundle, tmp_path / "default" / str(version))
    checked = []
    real = model_repository.verify_bundle
    monkeypatch.setattr(model_repository, "verify_bundle", lambda path: checked.append(path.name) or real(path))
    assert precheck(Settings(model_repository=tmp_path)) == [3] and checked == ["3"]  # latest:1
    checked.clear()
    assert precheck(Settings(model_repository=tmp_path, model_version_policy="specific:1")) == [1]
    assert checked == ["1"]


# --- hot reload, on real engines ---------------------------------------------------------------


def add_version(repository, tiny_bundle, version: int):
    """Copies a bundle in as the repository does it: staged under another name, then renamed."""
    staging = repository / "default" / f".staging-{version}"
    shutil.copytree(tiny_bundle, staging)
    staging.rename(repository / "default" / str(version))
    return repository / "default" / str(version)


def repository_settings(repository, **overrides) -> Settings:
    """A repository reloaded by hand (no poll), small batches, a short drain."""
    return Settings(
        model_repository=repository, model_poll_interval_s=0, max_batch_size=8, shutdown_grace_s=5, **overrides
    )


@contextlib.asynccontextmanager
async def started(settings: Settings):
    """A started ModelManager, stopped and unloaded afterwards."""
    models = ModelManager(settings)
    await models.start()
    try:
        yield models
    finally:
        await models.stop(1)
        await models.wait_unloaded()


def served_gauge(version: int) -> float | None:
    return metrics.REGISTRY.get_sample_value("captioning_model_served", {"model": "default", "version": str(version)})


def refused_gauge(version: int) -> float | None:
    return metrics.REGISTRY.get_sample_value("captioning_model_refused", {"model": "default", "version": str(version)})


def loads(version: int, result: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value(
            "captioning_model_loads_total", {"model": "default", "version": str(version), "result": result}
        )
        or 0.0
    )


def test_a_version_with_a_decoder_from_another_model_is_refused_and_the_served_one_stays(tmp_path, tiny_bundle):
    """Swapped in with the checksums rewritten, the files verify; the manifest's known answer does not."""
    from conftest import make_tiny_bundle

    repository = tmp_path / "models"
    add_version(repository, tiny_bundle, 1)
    staging = shutil.copytree(tiny_bundle, repository / "default" / ".staging-2")
    shutil.copy(make_tiny_bundle(tmp_path / "other", seed=8) / "decoder.keras", staging / "decoder.keras")
    write_manifest(staging, name="swapped", version="2", training={})
    settings = Settings(model_repository=repository, model_poll_interval_s=0, max_batch_size=8, request_timeout_s=20)

    async def scenario():
        models = ModelManager(settings)
        await models.start()
        staging.rename(repository / "default" / "2")
        report = await models.reload()
        assert list(report.refused) == [2] and "known answer" in report.refused[2]
        assert list(models.served) == [1] and loads(2, "refused") == 1.0
        await models.stop(1)
        await models.wait_unloaded()

    asyncio.run(scenario())


def test_hot_reload_swaps_refuses_rolls_back_and_unloads(tmp_path, tiny_bundle):
    repository = tmp_path / "models"
    add_version(repository, tiny_bundle, 1)
    settings = Settings(
        model_repository=repository, model_poll_interval_s=0, max_batch_size=8, request_timeout_s=20, shutdown_grace_s=5
    )
    image = np.zeros((32, 32, 3), np.uint8)

    async def scenario():
        models = ModelManager(settings)
        await models.start()
        assert list(models.served) == [1] and served_gauge(1) == 1.0

        # A request leases version 1, then version 2 appears and is swapped in.
        in_flight = models.acquire()
        add_version(repository, tiny_bundle, 2)
        report = await models.reload()
        assert report.loaded == [2] and report.unloaded == [1] and list(models.served) == [2]
        assert models.default.version == 2 and served_gauge(2) == 1.0 and served_gauge(1) is None
        # Both versions count each client's places together: no share per version.
        assert in_flight.engine.shares is models.default.engine.shares is models.client_shares
        # ... and finishes on version 1, whose engine waits for it.
        result = await in_flight.engine.submit(image, DecodeOptions(), deadline_s=10)
        assert result.captions and in_flight.engine.ready
        engine, captioner = weakref.ref(in_flight.engine._engine), weakref.ref(in_flight.captioner)
        in_flight.release()
        await models.wait_unloaded()
        gc.collect()
        assert engine() is None and captioner() is None  # stopped, and its model garbage-collected

        # A corrupt version 3 is refused; version 2 keeps serving. Its files changing retries it.
        broken = add_version(repository, tiny_bundle, 3)
        (broken / "encoder.keras").write_bytes(b"not a model")
        report = await models.reload()
        assert list(report.refused) == [3] and "the manifest says" in report.refused[3]
        assert list(models.served) == [2] and loads(3, "refused") == 1.0
        assert (await models.reload()).refused == {}  # not retried while its files are unchanged
        assert list(models.refused) == [3]  # but still known, for POST /admin/reload's answer
        assert loads(3, "refused") == 1.0

        # A version whose config does not fit its encoder (48 px, the encoder takes 32) is refused too.
        misfit = add_version(repository, tiny_bundle, 4)
        config = json.loads((misfit / "config.json").read_text())
        (misfit / "config.json").write_text(json.dumps({**config, "image_size": 48}))
        write_manifest(misfit, name="misfit", version="4", training={})
        report = await models.reload()
        assert list(report.refused) == [4] and list(models.served) == [2]
        # What the CaptioningModelVersionRefused alert reads; a refused version that leaves the
        # repository (or whose files change) is forgotten.
        assert refused_gauge(3) == 1.0 and refused_gauge(4) == 1.0 and refused_gauge(2) is None
        shutil.rmtree(broken)
        assert (await models.reload()).refused == {} and list(models.refused) == [4]
        assert refused_gauge(3) is None and refused_gauge(4) == 1.0

        # Rollback: pin version 1. A pin to a missing version changes nothing.
        report = await models.reload(VersionPolicy.parse("specific:1"))
        assert list(models.served) == [1] and report.loaded == [1] and report.unloaded == [2]
        with pytest.raises(NoServableVersion):
            await models.reload(VersionPolicy.parse("specific:9"))
        assert list(models.served) == [1] and str(models.policy) == "specific:1"

        served = models.acquire()
        result = await served.engine.submit(image, DecodeOptions(), deadline_s=10)
        served.release()
        assert result.captions
        await models.stop(1)
        await models.wait_unloaded()

    asyncio.run(scenario())


def test_service_polls_in_a_new_version_names_it_and_rolls_back_by_pin(tmp_path, tiny_bundle):
    import uploads
    from fastapi.testclient import TestClient

    from app.main import create_app

    repository = tmp_path / "models"
    add_version(repository, tiny_bundle, 1)
    settings = Settings(
        model_repository=repository,
        model_poll_interval_s=0.2,
        api_key="admin-key",
        max_batch_size=8,
        log_level="WARNING",
    )
    key = {"X-API-Key": "admin-key"}

    def caption_version(client) -> str:
        response = client.post("/caption", files={"image": ("a.png", uploads.png(), "image/png")}, headers=key)
        assert response.status_code == 200, response.text
        return response.json()["model"]["version"]

    with TestClient(create_app(settings)) as client:
        assert caption_version(client) == "1"
        info = client.get("/model", headers=key).json()
        assert (info["name"], info["version"]) == ("default", "1") and info["bundle"]["name"] == "tiny-random"
        first_digest = info["digest"]
        add_version(repository, tiny_bundle, 2)
        deadline = time.monotonic() + 120
        while client.get("/model", headers=key).json()["version"] != "2":  # the poll loads and swaps it
            assert time.monotonic() < deadline, "version 2 was not picked up by the poll"
            time.sleep(0.2)
        assert caption_version(client) == "2"
        assert client.get("/model", headers=key).json()["digest"] == first_digest  # the same files as version 1
        exported = client.get("/metrics").text
        assert 'captioning_model_requests_total{model="default",outcome="ok",version="2"} 1.0' in exported
        assert 'captioning_model_served{model="default",version="2"} 1.0' in exported

        assert client.post("/admin/reload", json={"version_policy": "specific:1"}).status_code == 401
        pinned = client.post("/admin/reload", json={"version_policy": "specific:1"}, headers=key)
        assert pinned.status_code == 200 and pinned.json()["served"] == [1], pinned.text
        assert caption_version(client) == "1"
        refused = client.post("/admin/reload", json={"version_policy": "specific:7"}, headers=key)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "reload_refused"
        assert client.post("/admin/reload", json={"version_policy": "newest"}, headers=key).status_code == 409
        huge = "specific:" + ",".join(map(str, range(1, 200_000)))  # would be echoed whole in the answer and log
        too_long = client.post("/admin/reload", json={"version_policy": huge}, headers=key)
        assert too_long.status_code == 422 and len(too_long.content) < 2000, too_long.text[:300]

    no_key = TestClient(create_app(Settings(model_repository=repository)))  # lifespan not run: no model needed
    assert no_key.post("/admin/reload").json()["error"]["code"] == "admin_disabled"


def test_a_version_whose_warm_up_request_fails_is_refused_not_served(tmp_path, tiny_bundle, monkeypatch):
    # A model that loads and compiles but cannot caption even a blank image would fail every request;
    # the engine used to log the warm-up's failure and say it was ready.
    from captioning.captioner import Captioner

    repository = tmp_path / "models"
    add_version(repository, tiny_bundle, 1)
    settings = repository_settings(repository)

    def broken(self, search):
        raise ValueError("operands could not be broadcast together")

    async def scenario():
        async with started(settings) as models:
            add_version(repository, tiny_bundle, 2)
            with monkeypatch.context() as patched:
                patched.setattr(Captioner, "results", broken)
                report = await models.reload()
            assert list(report.refused) == [2] and "the warm-up request failed" in report.refused[2]
            assert list(models.served) == [1]

    asyncio.run(scenario())


def test_a_rollback_pin_during_a_polls_load_wins_and_the_new_version_never_serves(tmp_path, tiny_bundle):
    repository = tmp_path / "models"
    add_version(repository, tiny_bundle, 1)
    settings = repository_settings(repository)

    async def scenario():
        async with started(settings) as models:
            real_load, loading, go_on = models._load, asyncio.Event(), asyncio.Event()

            async def slow_load(version, path, report):  # a warm-up of tens of seconds, held open
                loading.set()
                await go_on.wait()
                return await real_load(version, path, report)

            models._load = slow_load
            add_version(repository, tiny_bundle, 2)  # a bad release lands; the poll starts loading it
            poll = asyncio.create_task(models.reload())
            await loading.wait()
            served_during = []
            pin = asyncio.create_task(models.reload(VersionPolicy.parse("specific:1")))  # the operator rolls back
            await asyncio.sleep(0.05)
            go_on.set()
            while not pin.done():
                served_during.append(sorted(models.served))
                await asyncio.sleep(0.01)
            stood_down = await poll
            assert stood_down.loaded == [] and stood_down.served == [1]  # it loaded 2, but 2 never served
            assert (await pin).served == [1]
            assert all(versions == [1] for versions in served_during) and list(models.served) == [1]

    asyncio.run(scenario())


def test_a_poll_leaves_files_still_being_copied_for_a_later_pass(tmp_path, tiny_bundle):
    """`cp -r` into place: a new version waits, a served version re-copied in place keeps serving from
    memory; neither is refused (no ERROR, no refused-load count) until the copy settles."""
    import os

    repository = tmp_path / "models"
    served_dir = add_version(repository, tiny_bundle, 1)
    an_hour_ago = time.time() - 3600
    for path in served_dir.iterdir():
        os.utime(path, (an_hour_ago, an_hour_ago))
    settings = repository_settings(repository, model_version_policy="all")

    async def scenario():
        async with started(settings) as models:
            first = models.served[1]
            refused_before = loads(1, "refused"), loads(2, "refused")  # the registry is the process's
            new_dir = repository / "default" / "2"
            new_dir.mkdir()
            shutil.copy(tiny_bundle / "manifest.json", new_dir)  # the copy of version 2 has written one file so far
            shutil.copy(tiny_bundle / "manifest.json", served_dir)  # and version 1 is being re-copied over itself
            encoder = (tiny_bundle / "encoder.keras").read_bytes()
            (served_dir / "encoder.keras").write_bytes(encoder[: len(encoder) // 2])
            report = await models.reload(settle=True)
            assert report.refused == {} and list(models.served) == [1] and models.served[1] is first
            assert (loads(1, "refused"), loads(2, "refused")) == refused_before

            for path in tiny_bundle.iterdir():  # both copies finish
                shutil.copy(path, new_dir)
            (served_dir / "encoder.keras").write_bytes(encoder)
            in_an_hour = time.time() + 3600  # a clock running ahead (NFS, a tar made elsewhere) says nothing
            for path in [*new_dir.iterdir(), *served_dir.iterdir()]:
                os.utime(path, (in_an_hour, in_an_hour))
            report = await models.reload(settle=True)
            assert sorted(report.loaded) == [1, 2] and sorted(models.served) == [1, 2]
            assert models.served[1] is not first  # the settled copy, reloaded in place

    asyncio.run(scenario())


def test_a_poll_says_once_that_it_serves_from_memory(tmp_path, tiny_bundle, caplog):
    repository = tmp_path / "models"
    add_version(repository, tiny_bundle, 1)
    settings = repository_settings(repository)

    async def scenario():
        async with started(settings) as models:
            shutil.rmtree(repository / "default" / "1")  # the only version's directory, removed while served
            poll = asyncio.create_task(models.poll(0.01))
            await asyncio.sleep(0.3)
            poll.cancel()
            assert list(models.served) == [1]

    with caplog.at_level(logging.WARNING, "app"):
        asyncio.run(scenario())
    said = [r for r in caplog.records if "matches policy" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING and not said[0].exc_info


def test_a_version_counts_clients_leaving_and_refusals_apart_from_its_errors():
    """A client hanging up was counted as the version's error: a version's error ratio (a canary's
    comparison after a swap) followed its clients, not its model."""
    from app.engine import DeadlineExceeded, InferenceError, Overloaded
    from app.model_repository import VersionedEngine

    class Raising:
        def __init__(self, error):
            self.error = error

        async def submit(self, image, options, deadline_s=None, client=""):
            raise self.error

    def count(outcome):
        return (
            metrics.REGISTRY.get_sample_value(
                "captioning_model_requests_total", {"model": "audit", "version": "9", "outcome": outcome}
            )
            or 0
        )

    cases = [
        (asyncio.CancelledError(), "cancelled"),
        (Overloaded(1.0), "refused"),
        (DeadlineExceeded("late"), "deadline"),
        (InferenceError("boom"), "error"),
    ]
    for error, outcome in cases:
        before = count(outcome)
        with pytest.raises(type(error)):
            asyncio.run(VersionedEngine(Raising(error), "audit", 9).submit(None, DecodeOptions()))
        assert count(outcome) == before + 1, outcome
