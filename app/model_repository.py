"""The model repository: versioned bundles, a version policy, and hot reload without downtime.

    model_artifacts/               MODEL_REPOSITORY
      default/                     MODEL_NAME (the model this service serves)
        1/  manifest.json encoder.keras decoder.keras vocab.json config.json
        2/  ...                    integer versions; the highest is "latest"

    models = ModelManager(settings, state=app.state)
    await models.start()             # loads and warms what the policy selects; nothing usable: ArtifactError
    served = models.acquire(None)    # the highest served version (or a given one), leased by a request
    ...; served.release()
    await models.reload()            # new versions in, versions the policy dropped out (POST /admin/reload, poll)

Each version gets its own Captioner and inference engine (app.engine). A reload loads, verifies
(manifest checksums, as always) and warms the new version beside the serving ones, then swaps the
set of served versions in one assignment on the event loop. A request leases the version it
started on (app.dependencies.get_served), so it finishes there: a retired version stops taking
new requests at once, keeps its engine until its last lease is returned, and only then is stopped
and its memory released. A version that fails verification, loading or warm-up is refused with a
log line and remembered by its files' fingerprint (retried only when its files change); what was
serving keeps serving.

The policy (MODEL_VERSION_POLICY, as TF Serving's model_version_policy): `latest:N` serves the N
highest versions that load, `specific:1,3` serves exactly those, `all` every version. A refused
version does not count, so with latest:1 a broken new version leaves the previous one serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import anyio

from app import metrics
from app.engine import DeadlineExceeded, EngineStopped, Overloaded, client_shares
from app.errors import NotReady
from app.resources import encoder_precision
from app.settings import VERSION_POLICY_PATTERN
from captioning.artifacts import MANIFEST, ArtifactError, bundle_digest, is_bundle, scan_versions, verify_bundle

logger = logging.getLogger("app.models")

RETRY_AFTER_S = 5
# A retired version waits this long past the request deadline for its last lease before stopping.
DRAIN_MARGIN_S = 5.0


# --- the repository on disk -----------------------------------------------------------------


@dataclass(frozen=True)
class VersionPolicy:
    kind: str  # "latest", "specific" or "all"
    count: int = 1  # latest:N
    versions: tuple[int, ...] = ()  # specific:V,...

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """ "latest:2", "specific:1,3", "all" -> a policy; anything else raises ValueError. The
        pattern is MODEL_VERSION_POLICY's, so the API takes exactly what the setting takes."""
        if not re.fullmatch(VERSION_POLICY_PATTERN, text):
            raise ValueError(f"invalid version policy {text!r}: expected latest:N, specific:V[,V...] or all")
        kind, _, arguments = text.strip().partition(":")
        if kind == "latest":
            return cls("latest", count=int(arguments))
        if kind == "specific":
            return cls("specific", versions=tuple(sorted({int(v) for v in arguments.split(",")})))
        return cls("all")

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve among `available` (the loadable ones), highest first."""
        ordered = sorted(available, reverse=True)
        if self.kind == "latest":
            return ordered[: self.count]
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, self.versions))
        return "all"


SETTLE_S = 5.0  # a version whose newest file is younger than this is still being copied in


def _being_written(bundle: Path) -> bool:
    try:  # an empty directory: as old as the directory itself
        newest_ns = max((mtime_ns for _, _, mtime_ns in fingerprint(bundle)), default=bundle.stat().st_mtime_ns)
    except OSError:
        return False  # verification will say what is wrong
    return 0 <= time.time() - newest_ns / 1e9 < SETTLE_S  # a time in the future (clock skew) says nothing


def fingerprint(bundle: Path) -> tuple:
    """Names, sizes and modification times of a bundle's files: changes when a file does."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in bundle.iterdir() if p.is_file()))
    except OSError:
        return ()


@dataclass(frozen=True)
class Source:
    """Where the served model comes from: a model directory of versions, or one fixed bundle."""

    name: str
    model_dir: Path | None = None
    bundle: Path | None = None  # ARTIFACTS_DIR pointing at one bundle: served as version 1, never reloaded

    @classmethod
    def from_settings(cls, settings) -> Source:
        if settings.artifacts_dir is not None:
            path = Path(settings.artifacts_dir)
            if is_bundle(path) or not scan_versions(path):
                return cls(name=settings.model_name, bundle=path)
            return cls(name=path.name, model_dir=path)  # one model's directory of versions
        return cls(name=settings.model_name, model_dir=Path(settings.model_repository) / settings.model_name)

    @property
    def reloadable(self) -> bool:
        return self.model_dir is not None

    def versions(self) -> dict[int, Path]:
        return {1: self.bundle} if self.bundle is not None else scan_versions(self.model_dir)


def precheck(settings) -> list[int]:
    """Checksums only (no TensorFlow): the versions the policy would try, of which at least one
    must verify; else ArtifactError saying why. For `python -m app`, to fail fast and clearly."""
    source = Source.from_settings(settings)
    versions = source.versions()
    if not versions:
        raise ArtifactError(f"no model versions in {source.model_dir} (expected {source.model_dir}/1/{MANIFEST})")
    policy = VersionPolicy.parse(settings.model_version_policy) if source.reloadable else VersionPolicy("all")
    errors, good = [], []
    for version in sorted(versions, reverse=True):
        if policy.kind == "specific" and version not in policy.versions:
            continue  # never served: not worth hashing
        try:
            verify_bundle(versions[version])
            good.append(version)
        except ArtifactError as exc:
            errors.append(str(exc))
        if policy.kind == "latest" and len(good) == policy.count:
            break  # the older versions would not be served
    if not policy.select(good):
        raise ArtifactError(
            "no loadable version for policy "
            + str(policy)
            + ("; " + "; ".join(errors) if errors else f": the repository has versions {sorted(versions)}")
        )
    return policy.select(good)


# --- served versions --------------------------------------------------------------------------


@dataclass(eq=False)
class ServedModel:
    """One loaded, warmed-up version: its captioner and engine, and the requests leasing it."""

    name: str
    version: int
    path: Path
    captioner: object
    engine: object
    load_s: float
    warmup_s: float
    fingerprint: tuple = ()
    leases: int = 0
    retired: bool = False
    _drained: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.leases -= 1
        if self.leases == 0:
            self._drained.set()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.path),
            "load_s": round(self.load_s, 3),
            "warmup_s": round(self.warmup_s, 3),
            "bundle": self.captioner.manifest.get("bundle"),
        }


class VersionedEngine:
    """The engine of one version, counting its requests under model and version labels."""

    def __init__(self, engine, name: str, version: int):
        self._engine = engine
        self._labels = {"model": name, "version": str(version)}

    def __getattr__(self, attribute):
        return getattr(self._engine, attribute)

    async def submit(self, image, options, deadline_s: float | None = None, client: str = ""):
        started = time.perf_counter()
        outcome = "error"  # the model or engine failed: what a version's error ratio should count
        try:
            result = await self._engine.submit(image, options, deadline_s=deadline_s, client=client)
            outcome = "ok"
            return result
        except asyncio.CancelledError:
            outcome = "cancelled"  # the client left, or its other images' deadline passed
            raise
        except (Overloaded, EngineStopped):
            outcome = "refused"
            raise
        except DeadlineExceeded:
            outcome = "deadline"
            raise
        finally:
            metrics.MODEL_REQUESTS.labels(**self._labels, outcome=outcome).inc()
            if outcome == "ok":
                metrics.MODEL_REQUEST_SECONDS.labels(**self._labels).observe(time.perf_counter() - started)


class NoServableVersion(RuntimeError):
    """A reload would leave nothing to serve; nothing was changed."""


@dataclass
class ReloadReport:
    served: list[int] = field(default_factory=list)
    loaded: list[int] = field(default_factory=list)
    unloaded: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)


class ModelManager:
    """Loads, serves, reloads and unloads the versions of one model (see the module docstring)."""

    def __init__(self, settings, state=None, *, engine_factory=None):
        self.settings = settings
        self.source = Source.from_settings(settings)
        self.policy = (
            VersionPolicy.parse(settings.model_version_policy) if self.source.reloadable else VersionPolicy("all")
        )
        self.state = state  # app.state: its captioner / engine name the default version
        self._engine_factory = engine_factory
        # Each client's places, one set for every version: a client flooding version 2 is held at
        # the door too, which asks the default version's engine.
        self.client_shares = client_shares(settings)
        self._served: MappingProxyType[int, ServedModel] = MappingProxyType({})
        self._refused: dict[int, tuple[tuple, str]] = {}  # version -> (fingerprint, reason)
        self._lock = asyncio.Lock()
        self._pinning = 0  # reloads with a new policy waiting for, or holding, the lock
        self._settling: set[int] = set()  # versions a copy was still writing at the last pass
        self._retiring: set[asyncio.Task] = set()

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def served(self) -> MappingProxyType:
        """version -> ServedModel, replaced as a whole at each swap."""
        return self._served

    @property
    def default(self) -> ServedModel | None:
        return self._served[max(self._served)] if self._served else None

    def acquire(self, version: int | None = None) -> ServedModel:
        """Leases a served version (the highest when None) for one request; release() it after.
        Raises NotReady while nothing is served, KeyError for a version that is not served."""
        served = self._served
        if not served:
            raise NotReady("the model is not loaded yet", RETRY_AFTER_S)
        model = served[max(served) if version is None else version]
        model.leases += 1
        model._drained.clear()
        return model

    @property
    def refused(self) -> dict[int, str]:
        """Versions on disk that were refused and are not tried again until their files change, and why."""
        return {version: reason for version, (_, reason) in sorted(self._refused.items())}

    async def start(self) -> None:
        report = await self.reload()
        if not self._served:
            reasons = "; ".join(f"version {v}: {r}" for v, r in sorted(report.refused.items()))
            where = self.source.bundle or self.source.model_dir
            raise ArtifactError(
                f"no version of {self.name!r} could be served from {where} (policy {self.policy})"
                + (f": {reasons}" if reasons else ": no version directories")
            )

    async def reload(self, policy: VersionPolicy | None = None, settle: bool = False) -> ReloadReport:
        """Brings the served set in line with the repository and the policy (a new policy replaces
        the configured one until the next restart: a rollback pin). settle (the poll's passes): a
        version with a file written in the last SETTLE_S seconds is left for the next pass, so that
        a copy in progress (`cp -r` into place) is not refused with an error at every poll."""
        if policy is not None:
            self._pinning += 1  # a poll's pass already loading stands down for it (below)
        try:
            async with self._lock:
                return await self._reload(policy, settle)
        finally:
            if policy is not None:
                self._pinning -= 1

    async def _reload(self, policy: VersionPolicy | None, settle: bool) -> ReloadReport:
        """reload()'s work, under its lock."""
        previous_policy = self.policy
        if policy is not None:
            if not self.source.reloadable:
                raise ValueError("ARTIFACTS_DIR names one bundle: there are no versions to choose from")
            self.policy = policy
        report = ReloadReport()
        replaced: list[ServedModel] = []  # retired only after the swap: until then they serve
        on_disk = self.source.versions()
        current = dict(self._served)
        # Forget refusals whose files changed since (a fixed or re-copied version is retried).
        for version in list(self._refused):
            if version not in on_disk or fingerprint(on_disk[version]) != self._refused[version][0]:
                del self._refused[version]
                self._forget_refused_gauge(version)
        # A served version whose files were changed into something unloadable keeps serving
        # from memory; a refused version that is not served is out of the running.
        loadable = [v for v in on_disk if v not in self._refused or v in current]
        # Versions a copy is still writing (the poll's passes only): a new one waits for a later
        # pass, a served one keeps serving from memory until its new files settle.
        settling = {v for v in loadable if _being_written(on_disk[v])} if settle else set()
        if settle:
            for version in settling - self._settling:  # said once per copy
                labels = {"model": self.name, "version": str(version)}
                logger.info("model version still being written: left for a later pass", extra=labels)
            self._settling = settling
        loadable = [v for v in loadable if v not in settling or v in current]
        while True:  # load the wanted versions, best first; a refused one lets the next in line in
            if policy is None and self._pinning:
                # A rollback pin is waiting: it must not find a version this poll put live first.
                # What this pass loaded is dropped (its load still counts in the metrics); the pin decides.
                for model in current.values():
                    if model is not self._served.get(model.version):
                        self._retire(model)
                report.loaded, report.unloaded, report.served = [], [], sorted(self._served)
                return report
            wanted = self.policy.select(loadable)
            missing = [
                v
                for v in wanted
                if v not in self._refused
                and v not in settling
                and (v not in current or current[v].fingerprint != fingerprint(on_disk[v]))
            ]
            if not missing:
                break
            version = missing[0]
            loaded = await self._load(version, on_disk[version], report)
            if loaded is None:
                if version not in current:
                    loadable.remove(version)
                continue
            if policy is None and self._pinning:
                self._retire(loaded)  # not yet in `current`: the check at the loop's top retires the rest
                report.loaded.remove(version)
                continue
            if version in current:
                report.unloaded.append(version)  # replaced in place by changed files
                replaced.append(current[version])
            current[version] = loaded
        keep = set(self.policy.select(loadable))
        if self._served and not keep & current.keys():
            # Never swap to nothing: a pin to a missing version, or an emptied repository.
            for version, model in current.items():
                if model is not self._served.get(version):
                    self._retire(model)
            self.policy = previous_policy
            raise NoServableVersion(
                f"no version of {self.name!r} matches policy {policy or self.policy} and "
                f"loads (on disk: {sorted(on_disk)}); still serving {sorted(self._served)}"
            )
        if policy is not None:
            logger.info("version policy changed", extra={"model": self.name, "policy": str(policy)})
        for version in sorted(set(current) - keep):
            report.unloaded.append(version)
            replaced.append(current.pop(version))
        if current.keys() != self._served.keys() or any(current[v] is not self._served[v] for v in current):
            self._swap(current)
        for model in replaced:
            self._retire(model)
        report.served = sorted(self._served)
        return report

    async def _load(self, version: int, path: Path, report: ReloadReport) -> ServedModel | None:
        """Verifies, loads and warms one version beside the served ones; None (logged) if it fails."""
        from captioning.captioner import Captioner, inference_device  # TensorFlow: only once a model is loaded

        labels = {"model": self.name, "version": str(version)}
        prints = fingerprint(path)
        precision = encoder_precision(self.settings.encoder_precision, gpu=inference_device() != "CPU")
        logger.info("loading model version", extra={**labels, "path": str(path), "encoder_precision": precision})
        started = time.perf_counter()
        engine = None
        try:
            captioner = await anyio.to_thread.run_sync(
                functools.partial(Captioner.load, path, encoder_precision=precision)
            )
            loaded = time.perf_counter()
            _name_captioner(captioner, self.name, version, self.source.reloadable)
            engine = self._create_engine(captioner)
            await engine.start()
        except Exception as exc:  # noqa: BLE001  (a bad bundle must never take the serving version down)
            reason = str(exc) if isinstance(exc, ArtifactError) else f"{type(exc).__name__}: {exc}"
            logger.error("model version refused: %s", reason, extra=labels)
            if engine is not None:
                await engine.stop(0)
            self._refused[version] = (prints, reason)
            report.refused[version] = reason
            metrics.MODEL_LOADS.labels(**labels, result="refused").inc()
            metrics.MODEL_REFUSED.labels(**labels).set(1)
            return None
        warmed = time.perf_counter()
        metrics.MODEL_LOADS.labels(**labels, result="loaded").inc()
        metrics.MODEL_LOAD_SECONDS.labels(**labels, phase="load").set(loaded - started)
        metrics.MODEL_LOAD_SECONDS.labels(**labels, phase="warmup").set(warmed - loaded)
        logger.info(
            "model version loaded",
            extra={
                **labels,
                "load_s": round(loaded - started, 3),
                "warmup_s": round(warmed - loaded, 3),
                "digest": bundle_digest(captioner.manifest),
            },
        )
        # Both are optional stages of training (docs/TRAINING.md); a bundle without them serves, but less is said.
        if captioner.domain is None:
            logger.warning(
                "this model version has no out-of-domain check: answers carry no in_domain or domain_score "
                "(python -m training fit-domain adds one)",
                extra=labels,
            )
        if captioner.calibration is None:
            logger.warning(
                "this model version's confidence is not calibrated: it is the raw geometric-mean token "
                "probability (python -m training calibrate fits one for a model of the shapes domain, whose "
                "captions the scene checker can grade)",
                extra=labels,
            )
        training_warnings = (captioner.manifest.get("training") or {}).get("warnings") or []
        if training_warnings:
            logger.warning(
                "this model version was trained with warnings about its data (GET /model lists them): %s",
                "; ".join(map(str, training_warnings)),
                extra=labels,
            )
        report.loaded.append(version)
        return ServedModel(
            self.name,
            version,
            path,
            captioner,
            VersionedEngine(engine, self.name, version),
            loaded - started,
            warmed - loaded,
            prints,
        )

    def _create_engine(self, captioner):
        if self._engine_factory is not None:
            return self._engine_factory(captioner, self.settings)
        from app.engine import create_engine

        return create_engine(captioner, self.settings, self.client_shares)

    def _swap(self, current: dict[int, ServedModel]) -> None:
        """One assignment on the event loop: every request from here on sees the new set."""
        self._served = MappingProxyType(dict(current))
        default = self.default
        if self.state is not None:
            self.state.captioner = default.captioner if default else None
            self.state.engine = default.engine if default else None
            service = getattr(self.state, "service", None)  # None until the start-up has built it
            if service is not None and default is not None:
                self.state.service = service.for_model(default.captioner, default.engine)
        for version in current:
            metrics.MODEL_SERVED.labels(model=self.name, version=str(version)).set(1)
        logger.info(
            "serving model versions",
            extra={
                "model": self.name,
                "versions": sorted(current),
                "default_version": default.version if default else None,
            },
        )

    def _retire(self, model: ServedModel) -> None:
        model.retired = True
        if model.version not in self._served:  # (a version replaced in place is still served)
            try:
                metrics.MODEL_SERVED.remove(model.name, str(model.version))
            except KeyError:  # never served
                pass
        task = asyncio.get_running_loop().create_task(self._unload(model))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _unload(self, model: ServedModel, drain_s: float | None = None) -> None:
        """Waits for the version's last request, stops its engine and frees its memory."""
        drain_s = self.settings.request_timeout_s + DRAIN_MARGIN_S if drain_s is None else drain_s
        if model.leases:
            try:
                await asyncio.wait_for(model._drained.wait(), drain_s)
            except asyncio.TimeoutError:
                logger.warning(
                    "unloading with requests still leasing it",
                    extra={"model": model.name, "version": model.version, "leases": model.leases},
                )
        await model.engine.stop(self.settings.shutdown_grace_s)
        model.captioner = model.engine = None
        release_memory(refreeze=getattr(self.settings, "freeze_gc", True))
        logger.info("model version unloaded", extra={"model": model.name, "version": model.version})

    async def wait_unloaded(self) -> None:
        """Until every retired version is unloaded (tests, benchmarks)."""
        while self._retiring:
            await asyncio.wait(set(self._retiring))

    async def poll(self, interval_s: float) -> None:
        """Reloads every interval_s seconds, forever (a task cancelled at shutdown)."""
        said = None
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reload(settle=True)
                said = None
            except NoServableVersion as exc:
                # Serving goes on from memory (a pinned version's directory removed, the repository
                # emptied): said once when it starts, not with a traceback every poll.
                if str(exc) != said:
                    logger.warning("model repository: %s", exc, extra={"model": self.name})
                said = str(exc)
            except Exception:
                logger.exception("model repository poll failed")

    async def stop(self, grace_s: float) -> None:
        served, self._served = self._served, MappingProxyType({})
        await asyncio.gather(*(model.engine.stop(grace_s) for model in served.values()))
        for task in list(self._retiring):
            task.cancel()
        for version in self._refused:
            self._forget_refused_gauge(version)

    def _forget_refused_gauge(self, version: int) -> None:
        with contextlib.suppress(KeyError):  # another manager of the same name may have removed it
            metrics.MODEL_REFUSED.remove(self.name, str(version))


def _name_captioner(captioner, name: str, version: int, from_repository: bool) -> None:
    """In a repository the model's identity is <name>/<version>; the bundle's own manifest
    name and version are kept under "bundle". A single ARTIFACTS_DIR bundle keeps its manifest's."""
    manifest = dict(captioner.manifest)
    bundle = {"name": str(manifest.get("name", "unknown")), "version": str(manifest.get("version", "unknown"))}
    if from_repository:
        manifest.update(name=name, version=str(version))
    manifest["bundle"] = bundle
    captioner.manifest = manifest


def release_memory(refreeze: bool = True) -> None:
    """Collects the unloaded model's objects (the engine froze them out of the collector after
    warm-up) and returns freed heap pages to the OS, so RSS falls."""
    gc.unfreeze()
    gc.collect()
    if refreeze:
        gc.freeze()
    libc = ctypes.util.find_library("c")
    if libc:
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
