"""Load benchmark: the real server, in each batching mode, under closed- and open-loop load.

    python -m bench.load_test            # full run, ~9 minutes; writes bench/RESULTS.md
    python -m bench.load_test --quick    # ~3 minutes, shorter phases

For each mode (continuous, static, none) it starts `python -m app` on a free loopback port with
BATCHING_MODE set and waits for /health/ready; all three then stay up, and the load phases take
turns between them (each load level in every mode before the next level), so that the shared
machine's changing background load falls on every mode alike. Each phase drives POST /caption with
PNGs of the embedded shapes test split:

  closed loop   N clients, each sending its next request when the last one is answered
  open loop     Poisson arrivals at fixed rates, below and past capacity (latency is measured
                from each request's scheduled arrival, so a slow server cannot slow the load)

and, in this process before any server starts, two references: the offline limit (in-process
Captioner.caption at its best batch size, no HTTP) and the reference design's naive loop (one
image, an eager Keras decoder call per token). The client shares the CPU with the server, so it
is a plain asyncio HTTP/1.1 client over keep-alive connections with every request pre-encoded;
its own CPU time per request is reported with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `python -m app` sets it, for the in-process engine

import numpy as np  # noqa: E402

from bench.harness import (  # noqa: E402
    DEFAULT_BUNDLE,
    ENGINE_SERIES,
    REFUSAL_SERIES,
    REPO,
    Connection,
    NoisyNeighbour,
    Outcome,
    Server,
    caption_request,
    closed_loop,
    cpu_seconds,
    encoder_like_the_service,
    engine_counters,
    load_images,
    open_loop,
    percentile,
    rss_mib,
)

MODES = ("continuous", "static", "none")
CLOSED_LOOP_CLIENTS = (1, 8, 32, 64)
OPEN_LOOP_LOAD = (0.5, 0.9, 1.5)  # arrival rates as fractions of the continuous mode's capacity
# Capacity: what the continuous server serves of open-loop arrivals at its closed-loop best. Not
# further past it: refusing a deep overload costs the server CPU too (round 18: a probe at 1.5x
# served 216/s, and a later phase at 324/s was served whole).
OPEN_LOOP_PROBE = 1.0
FIRST_REQUESTS = 5  # sent one by one right after readiness: a first-request spike shows here


# ---------------------------------------------------------------------------- references


@dataclass
class References:
    one_image_ms: float  # p50 in-process latency of Captioner.caption on one image
    offline_per_s: float  # best in-process batched throughput
    offline_batch: int
    offline_by_batch: dict[int, float]
    offline_cpu_ms: float  # process CPU time per caption at that batch size
    threads: int  # TensorFlow intra-op threads, as the service sets them
    naive_ms: float  # p50 per image of the eager, token-by-token reference loop
    naive_matches: float  # share of images where the naive loop's caption equals the engine path's
    mean_words: float
    engine_per_s: float  # the continuous engine in-process: 32 concurrent submitters, no HTTP
    engine_p50_ms: float


def naive_caption(encoder, decoder, image: np.ndarray, max_steps: int) -> list[int]:
    """The reference design's loop: one image, Keras models and layers called eagerly, one call per
    token carrying the GRU state (as the reference lab's decoder_pred_model did), greedy choice."""
    import tensorflow as tf

    from captioning.model import DecoderStep
    from captioning.tokenizer import END_ID, START_ID

    step = DecoderStep(decoder)
    features = encoder(tf.constant(image[None], tf.float32), training=False)
    state = tf.zeros((1, step.state_size))
    tokens = [START_ID]
    for _ in range(max_steps):
        log_probs, state, _ = step(tf.constant([tokens[-1]], tf.int32), state, features)
        token = int(np.argmax(log_probs[0]))
        tokens.append(token)
        if token == END_ID:
            break
    return tokens[1:]


def measure_references(
    artifacts: Path, pixels: list[np.ndarray], quick: bool, threads: int, encoder_precision: str
) -> References:
    """In this process, at the service's TensorFlow thread setting (`threads`, 0: as the service
    chooses), so that the offline limit is the ceiling of the same configuration."""
    import tensorflow as tf

    from app.main import configure_inference_threads
    from captioning.captioner import Captioner
    from captioning.decoding import DecodeOptions

    configure_inference_threads(threads)

    captioner = Captioner.load(artifacts, encoder_precision=encoder_precision)  # the service's encoder
    captioner.warmup()
    pixels = [captioner.prepare(image) for image in pixels]  # at the model's input size, as the service resizes
    options = DecodeOptions()
    single = []
    for image in pixels[: 20 if quick else 50]:
        started = time.perf_counter()
        captioner.caption([image], options)
        single.append(time.perf_counter() - started)
    images = pixels[: 128 if quick else 256]
    by_batch, cpu_ms = {}, {}
    for batch in (8, 16, 32, 64):
        started, cpu_started = time.perf_counter(), time.process_time()
        captions = captioner.caption(images, options, batch_size=batch)
        by_batch[batch] = len(images) / (time.perf_counter() - started)
        cpu_ms[batch] = (time.process_time() - cpu_started) / len(images) * 1e3
    best = max(by_batch, key=by_batch.get)
    engine_per_s, engine_p50_ms = asyncio.run(engine_in_process(captioner, pixels, 32, 2.0 if quick else 4.0))
    naive, matches = [], 0
    sample = pixels[: 10 if quick else 25]
    naive_caption(captioner.encoder, captioner.decoder, sample[0], 2)  # first eager calls build the layers
    for image, expected in zip(sample, captions):
        started = time.perf_counter()
        tokens = naive_caption(captioner.encoder, captioner.decoder, image, captioner.max_steps(options))
        naive.append(time.perf_counter() - started)
        matches += captioner.tokenizer.decode(tokens) == expected[0].tokens
    return References(
        one_image_ms=statistics.median(single) * 1e3,
        offline_per_s=by_batch[best],
        offline_batch=best,
        offline_by_batch=by_batch,
        offline_cpu_ms=cpu_ms[best],
        threads=tf.config.threading.get_intra_op_parallelism_threads(),
        naive_ms=statistics.median(naive) * 1e3,
        naive_matches=matches / len(sample),
        mean_words=statistics.mean(len(c[0].tokens) for c in captions),
        engine_per_s=engine_per_s,
        engine_p50_ms=engine_p50_ms,
    )


async def engine_in_process(
    captioner, pixels: list[np.ndarray], clients: int, duration_s: float
) -> tuple[float, float]:
    """The service's engine (continuous, default settings) driven directly, without HTTP: what the
    batching itself reaches on this machine. Returns (captions/s, p50 latency ms)."""
    from app.engine import create_engine
    from app.settings import Settings
    from captioning.decoding import DecodeOptions

    engine = create_engine(captioner, Settings(batching_mode="continuous", max_batch_size=32))
    await engine.start()
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration_s

    async def client(index: int) -> None:
        for n in range(1_000_000):
            if time.perf_counter() >= stop_at:
                break
            started = time.perf_counter()
            await engine.submit(pixels[(index + 7 * n) % len(pixels)], DecodeOptions())
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    await engine.stop()
    return len(latencies) / elapsed, statistics.median(latencies) * 1e3


# ------------------------------------------------------------------------------------ run


@dataclass
class Phase:
    mode: str
    kind: str  # "closed" or "open"
    load: float  # clients, or arrivals per second
    outcome: Outcome
    server_cpu_s: float
    client_cpu_s: float
    engine: dict[str, float]
    rss_mib: float

    def pooled_with(self, other: Phase) -> Phase:
        """This phase and a repeat of it as one: samples pooled, times and counters added."""
        engine = {name: self.engine[name] + other.engine[name] for name in self.engine}
        return Phase(
            self.mode,
            self.kind,
            self.load,
            self.outcome.pooled_with(other.outcome),
            self.server_cpu_s + other.server_cpu_s,
            self.client_cpu_s + other.client_cpu_s,
            engine,
            other.rss_mib,
        )


async def run_phase(
    server: Server, kind: str, load: float, requests: list[bytes], duration_s: float, warmup_s: float, seed: int
) -> Phase:
    before = await engine_counters(server.port)
    server_cpu, client_cpu = cpu_seconds(server.process.pid), time.process_time()
    started = time.perf_counter()
    if kind == "closed":
        outcome = await closed_loop(server.port, requests, int(load), duration_s, warmup_s)
    else:
        outcome = await open_loop(server.port, requests, load, duration_s, seed)
    outcome.wall_s = time.perf_counter() - started
    server_cpu, client_cpu = cpu_seconds(server.process.pid) - server_cpu, time.process_time() - client_cpu
    after = await engine_counters(server.port)
    engine = {name: after[name] - before[name] for name in ENGINE_SERIES + REFUSAL_SERIES}
    phase = Phase(server.mode, kind, load, outcome, server_cpu, client_cpu, engine, rss_mib(server.process.pid))
    print(describe(phase), flush=True)
    return phase


def describe(phase: Phase) -> str:
    o = phase.outcome
    load = f"{int(phase.load)} clients" if phase.kind == "closed" else f"{phase.load:.0f}/s"
    return (
        f"  {phase.mode:10s} {phase.kind:6s} {load:>11s}: {o.served_per_s:7.1f} captions/s  "
        f"p50 {percentile(o.latencies_s, 50) * 1e3:7.1f} ms  p95 {percentile(o.latencies_s, 95) * 1e3:7.1f} ms  "
        f"503 {len(o.rejected_s)}  errors {describe_errors(o)}  rss {phase.rss_mib:.0f} MiB"
    )


def describe_errors(outcome: Outcome) -> str:
    """The error count, with its kinds: HTTP statuses, and failures on the client side (refused or
    reset connections, no free connection under the open-loop cap, 60 s timeouts)."""
    kinds = [f"{status}: {n}" for status, n in sorted(outcome.statuses.items()) if status not in (200, 503)]
    if outcome.client_errors:
        named = ", ".join(f"{kind} x{count}" for kind, count in sorted(outcome.client_error_kinds.items()))
        kinds.append(f"client: {outcome.client_errors}" + (f": {named}" if named else ""))
    return f"{outcome.errors} ({', '.join(kinds)})" if kinds else "0"


async def benchmark(args, requests: list[bytes], log_dir: Path) -> tuple[list[Phase], dict]:
    """Every mode's server runs from the start, and the phases take turns: each load level is
    measured in every mode before the next level, `repeats` times over for the closed loop, so a
    change in the shared machine's background load falls on all modes alike. An idle server
    costs nothing measurable (its threads sleep)."""
    servers: dict[str, Server] = {}
    info: dict[str, dict] = {mode: {} for mode in args.modes}
    pooled: dict[tuple[str, str, float], Phase] = {}

    async def measure(mode: str, kind: str, load: float, warmup_s: float, seed: int) -> None:
        phase = await run_phase(servers[mode], kind, load, requests, args.duration, warmup_s, seed)
        key = (mode, kind, load)
        pooled[key] = pooled[key].pooled_with(phase) if key in pooled else phase

    try:
        for mode in args.modes:  # one at a time, so that each start-up time is its own
            server = servers[mode] = Server(mode, args.artifacts, dict(args.env), log_dir / f"server-{mode}.log")
            info[mode]["ready_s"] = await server.wait_ready()
            info[mode]["rss_ready"] = rss_mib(server.process.pid)
            info[mode]["first_ms"] = await first_requests(server.port, requests[:FIRST_REQUESTS])
            # The next server starts, and the phases begin, only once this one has compiled.
            info[mode]["warm_s"] = info[mode]["ready_s"] + await server.wait_warm()
            print(
                f"{mode}: ready in {info[mode]['ready_s']:.1f} s (port {server.port}); first requests "
                f"{', '.join(f'{v:.0f}' for v in info[mode]['first_ms'])} ms; compiled after "
                f"{info[mode]['warm_s']:.1f} s",
                flush=True,
            )
        for repeat in range(args.repeats):
            for clients in args.clients:
                for mode in args.modes:
                    await measure(mode, "closed", clients, args.warmup, 10 * repeat + clients)
        for mode, server in servers.items():
            info[mode]["rss_loaded"] = rss_mib(server.process.pid)
        closed_capacity = max(
            (
                p.outcome.served_per_s
                for (mode, kind, _), p in pooled.items()
                if mode == "continuous" and kind == "closed"
            ),
            default=0.0,
        )
        capacity = closed_capacity
        if not args.rates and "continuous" in servers and closed_capacity > 0:
            # Open-loop arrivals cost more than a closed loop's (a connection and a task each, on
            # the same cores as the server): the idle run of round 18 served at most 262-271/s open
            # loop against 363/s closed, so its "0.9x" phase was an overload. What the continuous
            # server serves of open-loop arrivals sets the rates instead (not pooled: a probe).
            probe_rate = round(closed_capacity * OPEN_LOOP_PROBE)
            probe = await run_phase(servers["continuous"], "open", probe_rate, requests, args.duration, 0.0, 99)
            capacity = min(closed_capacity, probe.outcome.served_per_s)
            await asyncio.sleep(1.0)
        rates = args.rates or [round(capacity * f) for f in OPEN_LOOP_LOAD]
        for seed, rate in enumerate(rates):
            for mode in args.modes:
                await measure(mode, "open", rate, 0.0, 100 + seed)
                await asyncio.sleep(1.0)  # let the backlog of the last phase clear
        for mode, server in servers.items():
            info[mode]["rss_end"] = rss_mib(server.process.pid)
            info[mode]["alive"] = server.process.poll() is None
            info[mode]["capacity"] = capacity
            info[mode]["closed_capacity"] = closed_capacity
            info[mode]["rates"] = rates
    finally:
        for mode, server in servers.items():
            info[mode]["exit_code"], info[mode]["stop_s"] = server.stop()
    order = {mode: i for i, mode in enumerate(args.modes)}
    phases = sorted(pooled.values(), key=lambda p: (p.kind != "closed", order[p.mode], p.load))
    return phases, info


async def first_requests(port: int, requests: list[bytes]) -> list[float]:
    """Latency (ms) of the first requests after readiness, one at a time."""
    connection, latencies = Connection(port), []
    try:
        for raw in requests:
            started = time.perf_counter()
            await asyncio.wait_for(connection.request(raw), 60)
            latencies.append((time.perf_counter() - started) * 1e3)
    finally:
        connection.close()
    return latencies


def load_average() -> str:
    """Other work on the machine shows here; the run itself keeps about two runnable threads busy."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


async def main_async(args) -> int:
    log_dir = REPO / "bench" / "out"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"images: {args.images} from the shapes test split; model: {args.artifacts}", flush=True)
    pixels, pngs = load_images(args.images)
    references = None
    if not args.skip_references:
        print("references (in-process, no server running) ...", flush=True)
        references = await asyncio.to_thread(
            measure_references,
            args.artifacts,
            pixels,
            args.quick,
            int(dict(args.env).get("INFERENCE_THREADS", 0)),
            args.encoder_precision,
        )
        print(
            f"  one image {references.one_image_ms:.1f} ms; offline {references.offline_per_s:.0f} captions/s "
            f"at batch {references.offline_batch}; naive loop {references.naive_ms:.1f} ms/image; engine "
            f"without HTTP {references.engine_per_s:.0f} captions/s",
            flush=True,
        )
    requests = [caption_request(png) for png in pngs]
    with contextlib.ExitStack() as stack:
        if args.noisy_neighbour:
            neighbour = stack.enter_context(NoisyNeighbour())
            print(f"noisy neighbour: pid {neighbour.process.pid}, one busy core", flush=True)
        all_phases, servers = await benchmark(args, requests, log_dir)
        cpu_profile = None
        if not args.skip_profile and "continuous" in args.modes:
            from bench.cpu_profile import profile

            print("CPU profile of the continuous server, 32 clients ...", flush=True)
            cpu_profile = await profile(
                "continuous", 32, args.duration, args.artifacts, requests, log_dir, dict(args.env)
            )
    report = render_report(args, references, all_phases, servers, cpu_profile)
    args.output.write_text(report)
    print(f"\nwrote {args.output.relative_to(REPO) if args.output.is_relative_to(REPO) else args.output}")
    print(report)
    return 0


# --------------------------------------------------------------------------------- report


def render_report(
    args,
    refs: References | None,
    phases: list[Phase],
    servers: dict,
    cpu_profile: tuple[dict[str, float], float] | None = None,
) -> str:
    def ms(seconds: float) -> str:
        return "–" if math.isnan(seconds) else f"{seconds * 1e3:.0f}" if seconds >= 0.1 else f"{seconds * 1e3:.1f}"

    lines = [
        "# Load benchmark",
        "",
        f"- Command: `{args.command}`",
        f"- Date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores (shared by server and client); "
        f"load average (1/5/15 min) before the run {args.load_before}, after it {load_average()}",
        f"- Model: `{args.artifacts.relative_to(REPO) if args.artifacts.is_relative_to(REPO) else args.artifacts}`; "
        f"images: {args.images} PNGs of the shapes test split (64x64); greedy decoding; encoder precision "
        f"{args.encoder_precision} (TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')}), the servers' "
        "and the in-process references' alike",
        f"- Phases: {args.duration:g} s each (closed loop after {args.warmup:g} s of warm-up; {args.repeats} rounds, "
        "pooled); all modes' servers run throughout and the phases take turns between them; server settings "
        f"are the service defaults{' plus ' + ', '.join(f'{k}={v}' for k, v in args.env) if args.env else ''}",
        "- Noisy neighbour: "
        + (
            "a CPU-bound process (one busy core, same priority) ran beside the servers through every server phase"
            if args.noisy_neighbour
            else "none"
        ),
        open_loop_basis(args, servers.get("continuous", {})),
        "",
    ]
    if refs:
        lines += [
            "## References (in-process, same run)",
            "",
            "| reference | result |",
            "|---|---|",
            f"| one image, `Captioner.caption` (p50) | {refs.one_image_ms:.1f} ms |",
            f"| offline limit, `Captioner.caption` at the best batch size ({refs.offline_batch}) "
            f"| {refs.offline_per_s:.0f} captions/s ({refs.offline_cpu_ms:.2f} ms CPU per caption; "
            f"{refs.threads} TensorFlow intra-op thread(s), as the service) |",
            "| offline by batch size | "
            + ", ".join(f"{b}: {v:.0f}/s" for b, v in refs.offline_by_batch.items())
            + " |",
            f"| naive loop: one image, eager Keras call per token (p50) | {refs.naive_ms:.1f} ms/image = "
            f"{1e3 / refs.naive_ms:.1f} captions/s (same caption as the engine path for "
            f"{refs.naive_matches:.0%} of images) |",
            f"| the continuous engine in-process, 32 concurrent submitters, no HTTP "
            f"| {refs.engine_per_s:.0f} captions/s, p50 {refs.engine_p50_ms:.0f} ms |",
            f"| mean caption length | {refs.mean_words:.1f} words |",
            "",
        ]
    lines += [
        "## Closed loop",
        "",
        "| mode | clients | captions/s | p50 ms | p95 ms | p99 ms | errors | 503 | mean step batch | encoding | "
        "decoding | server CPU ms/caption | client CPU ms/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in (p for p in phases if p.kind == "closed"):
        lines.append(row(p, ms, closed=True))
    lines += [
        "",
        "## Open loop (Poisson arrivals)",
        "",
        "| mode | offered /s | captions/s | p50 ms | p95 ms | rejected (503) | 503 p99 ms | 503 within 50 ms "
        "at the server | errors | mean step batch | encoding | decoding | server RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in (p for p in phases if p.kind == "open"):
        lines.append(row(p, ms, closed=False))
    if cpu_profile:
        groups, throughput = cpu_profile
        lines += [
            "",
            f"## Server CPU per caption, continuous, 32 clients ({throughput:.0f} captions/s; "
            "`python -m bench.cpu_profile`)",
            "",
            "| thread | CPU ms per caption |",
            "|---|---:|",
            *(f"| {group} | {ms:.2f} |" for group, ms in groups.items() if ms >= 0.005),
            f"| total | {sum(groups.values()):.2f} |",
        ]
        if refs:
            lines.append(f"| (offline, whole process, for comparison) | {refs.offline_cpu_ms:.2f} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [
        f"| {t} | {m} | {'yes' if ok else '**no**' if ok is not None else 'n/a'} |"
        for t, m, ok in check_targets(refs, phases, servers, cpu_profile)
    ]
    lines += [
        "",
        "## Server lifecycle",
        "",
        "| mode | ready after s | first requests after ready, ms | background compilation done after s | "
        "RSS after warm-up MiB | RSS after closed loops MiB | RSS at the end MiB | up at the end | "
        "SIGTERM -> exit s | exit code |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for mode, s in servers.items():
        first = ", ".join(f"{v:.0f}" for v in s["first_ms"])
        lines.append(
            f"| {mode} | {s['ready_s']:.1f} | {first} | {s['warm_s']:.1f} | {s['rss_ready']:.0f} | "
            f"{s['rss_loaded']:.0f} | "
            f"{s['rss_end']:.0f} | {'yes' if s['alive'] else 'NO'} | {s['stop_s']:.1f} | {s['exit_code']} |"
        )
    lines += [
        "",
        "Exit code -15: uvicorn re-raises SIGTERM after its graceful shutdown, so a clean stop reports the signal.",
        "",
        "Columns: *encoding* and *decoding* are the shares of wall time spent in encoder calls and in "
        "decoder steps (from /metrics; in continuous mode they run in two threads and overlap, in the "
        "others one thread does both); *mean step batch* is the mean number of rows per decoder step; CPU columns "
        "are process CPU time divided by completed requests. Latencies of successful requests only; open-loop "
        "latency counts from each request's scheduled arrival.",
        "",
    ]
    return "\n".join(lines)


def open_loop_basis(args, continuous: dict) -> str:
    if args.rates:
        return "- Open-loop rates: as given"
    capacity, closed = continuous.get("capacity", math.nan), continuous.get("closed_capacity", math.nan)
    return (
        f"- Open-loop rates: {', '.join(f'{f:g}' for f in OPEN_LOOP_LOAD)}x a capacity of {capacity:.0f} captions/s, "
        f"what the continuous server served of open-loop arrivals at {OPEN_LOOP_PROBE:g}x its closed-loop best "
        f"({closed:.0f}/s; a probe phase, not reported below)"
    )


def check_targets(
    refs: References | None,
    phases: list[Phase],
    servers: dict,
    cpu_profile: tuple[dict[str, float], float] | None = None,
) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, each with what this run measured."""
    closed = {(p.mode, int(p.load)): p for p in phases if p.kind == "closed"}
    opened = [p for p in phases if p.kind == "open"]
    checks: list[tuple[str, str, bool | None]] = []
    for clients in (32, 64):
        c = closed.get(("continuous", clients))
        if c and refs:
            share = c.outcome.served_per_s / refs.offline_per_s
            checks.append(
                (
                    f"{clients} clients: continuous throughput >= 90% of the offline limit (same threads)",
                    f"{c.outcome.served_per_s:.0f} / {refs.offline_per_s:.0f} = {share:.0%}",
                    share >= 0.9,
                )
            )
        if c and refs:
            ratio = c.server_cpu_s / max(len(c.outcome.latencies_s), 1) * 1e3 / refs.offline_cpu_ms
            checks.append(
                (f"{clients} clients: server CPU per caption <= 1.25x offline", f"{ratio:.2f}x", ratio <= 1.25)
            )
    if cpu_profile:
        groups, _ = cpu_profile
        loop_ms = groups.get("event loop (HTTP)", math.nan)
        checks.append(("event-loop CPU <= 0.5 ms/caption (profile, 32 clients)", f"{loop_ms:.2f} ms", loop_ms <= 0.5))
    c1 = closed.get(("continuous", 1))
    if c1 and refs:
        p50 = percentile(c1.outcome.latencies_s, 50) * 1e3
        checks.append(
            (
                "1 client: continuous p50 <= 1.2x in-process latency of one image",
                f"{p50:.1f} ms / {refs.one_image_ms:.1f} ms = {p50 / refs.one_image_ms:.2f}x",
                p50 / refs.one_image_ms <= 1.2,
            )
        )
    for load in sorted({int(p.load) for p in phases if p.kind == "closed"}):
        c, st = closed.get(("continuous", load)), closed.get(("static", load))
        if c and st:
            checks.append(versus_static(f"{load} clients", c.outcome, st.outcome))
    capacity = servers.get("continuous", {}).get("capacity", math.inf)
    for rate in sorted({p.load for p in opened}):
        c = next((p.outcome for p in opened if p.mode == "continuous" and p.load == rate), None)
        st = next((p.outcome for p in opened if p.mode == "static" and p.load == rate), None)
        if c and st and c.latencies_s and st.latencies_s:
            label = f"open loop {rate:.0f}/s" + (f" ({rate / capacity:.1f}x capacity)" if capacity else "")
            checks.append(versus_static_open(label, c, st))
    for mode, info in servers.items():
        checks.append((f"{mode}: ready <= 10 s after process start", f"{info['ready_s']:.1f} s", info["ready_s"] <= 10))
    below = [p for p in phases if p.mode == "continuous" and (p.kind == "closed" or p.load < capacity)]
    past = [p for p in opened if p.mode == "continuous" and p.load > capacity]
    errors = sum(p.outcome.errors for p in below)
    checks.append(
        (
            "continuous, below capacity: no errors (a status but 200 and 503, or a failed connection)",
            str(errors),
            errors == 0,
        )
    )
    rejected_below = sum(len(p.outcome.rejected_s) for p in below)
    checks.append(
        (
            "continuous, below capacity: no 503 (closed loops, open loop under capacity)",
            str(rejected_below),
            rejected_below == 0,
        )
    )
    for p in past:
        # The open-loop rates are fractions of a capacity measured with few clients; a server that
        # keeps up with the "overload" refuses nothing, which passes as long as nothing failed.
        refused = bool(p.outcome.rejected_s)
        worst = percentile(p.outcome.rejected_s, 99) if refused else 0.0
        checks.append(
            (
                f"continuous, past capacity ({p.load:.0f}/s): 503 answered within 50 ms (p99), every request answered",
                (
                    f"client p99 {worst * 1e3:.1f} ms (at the server: {server_refusals(p)} within 50 ms)"
                    if refused
                    else "none refused"
                )
                + f"; {p.outcome.client_errors} failed on the client side",
                worst <= 0.05 and not p.outcome.client_errors,
            )
        )
    for mode, info in servers.items():
        growth = info["rss_end"] - info["rss_loaded"]
        checks.append(
            (
                f"{mode}: server up after the overload phases, memory steady through them",
                f"up: {'yes' if info['alive'] else 'no'}; RSS {info['rss_loaded']:.0f} MiB before the open "
                f"loop, {info['rss_end']:.0f} MiB after",
                info["alive"] and growth < 0.1 * info["rss_loaded"],
            )
        )
    return checks


def versus_static(label: str, continuous: Outcome, static: Outcome) -> tuple[str, str, bool]:
    ct, st = continuous.served_per_s, static.served_per_s
    cp, sp = percentile(continuous.latencies_s, 95), percentile(static.latencies_s, 95)
    return (
        f"{label}: continuous >= static captions/s and <= static p95",
        f"{ct:.0f} vs {st:.0f}/s; p95 {cp * 1e3:.0f} vs {sp * 1e3:.0f} ms",
        ct >= st and cp <= sp,
    )


def versus_static_open(label: str, continuous: Outcome, static: Outcome) -> tuple[str, str, bool]:
    """Open loop: both modes get the same arrivals (same seed), so throughput is the captions served
    of them; captions/s would also count how long the last one took, a tie-breaker below capacity."""
    cn, sn, arrivals = len(continuous.latencies_s), len(static.latencies_s), static.total
    cp, sp = percentile(continuous.latencies_s, 95), percentile(static.latencies_s, 95)
    return (
        f"{label}: continuous serves >= static of the same arrivals, p95 <= static's",
        f"{cn} vs {sn} of {arrivals} ({continuous.served_per_s:.0f} vs {static.served_per_s:.0f}/s); "
        f"p95 {cp * 1e3:.0f} vs {sp * 1e3:.0f} ms",
        cn >= sn and cp <= sp,
    )


def server_refusals(p: Phase) -> str:
    count = p.engine["server_503"]
    return f"{p.engine['server_503_within_50ms'] / count:.0%}" if count else "–"


def row(p: Phase, ms, closed: bool) -> str:
    o, e = p.outcome, p.engine
    done = len(o.latencies_s)
    throughput = o.served_per_s
    step_batch = e["batch_size_sum"] / e["batch_size_count"] if e["batch_size_count"] else math.nan
    busy = f"{e['encode_seconds_sum'] / o.wall_s:.0%} | {e['step_seconds_sum'] / o.wall_s:.0%}"
    if closed:
        return (
            f"| {p.mode} | {int(p.load)} | {throughput:.1f} | {ms(percentile(o.latencies_s, 50))} | "
            f"{ms(percentile(o.latencies_s, 95))} | {ms(percentile(o.latencies_s, 99))} | {describe_errors(o)} | "
            f"{len(o.rejected_s)} | {step_batch:.1f} | {busy} | "
            f"{p.server_cpu_s / max(done, 1) * 1e3:.1f} | {p.client_cpu_s / max(o.total, 1) * 1e3:.2f} |"
        )
    rejected = len(o.rejected_s) / max(o.total, 1)
    return (
        f"| {p.mode} | {p.load:.0f} | {throughput:.1f} | {ms(percentile(o.latencies_s, 50))} | "
        f"{ms(percentile(o.latencies_s, 95))} | {rejected:.1%} | {ms(percentile(o.rejected_s, 99))} | "
        f"{server_refusals(p)} | "
        f"{describe_errors(o)} | {step_batch:.1f} | {busy} | {p.rss_mib:.0f} |"
    )


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m bench.load_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases and references (~3 minutes)")
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from continuous,static,none")
    parser.add_argument("--clients", default=",".join(map(str, CLOSED_LOOP_CLIENTS)))
    parser.add_argument(
        "--rates",
        default=None,
        help="open-loop arrivals/s, comma-separated (default: fractions of the continuous mode's measured capacity)",
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds per phase")
    parser.add_argument(
        "--repeats", type=int, default=None, help="closed-loop rounds, pooled (default 2, 1 with --quick)"
    )
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra server setting, e.g. --env MAX_BATCH_SIZE=64 (repeatable)",
    )
    parser.add_argument("--skip-references", action="store_true")
    parser.add_argument(
        "--noisy-neighbour",
        action="store_true",
        help="run a CPU-bound process (one busy core) beside the servers throughout",
    )
    parser.add_argument("--skip-profile", action="store_true", help="skip the per-thread CPU profile phase")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    args.command = "python -m bench.load_test" + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    args.modes = [m for m in args.modes.split(",") if m]
    if unknown := set(args.modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}")
    args.clients = [int(c) for c in args.clients.split(",") if c]
    args.rates = [float(r) for r in args.rates.split(",")] if args.rates else None
    args.duration = args.duration or (4.0 if args.quick else 6.0)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.warmup = 1.0
    args.env = [tuple(item.split("=", 1)) for item in args.env]
    args.artifacts = args.artifacts.resolve()
    args.encoder_precision = encoder_like_the_service(dict(args.env))
    args.load_before = load_average()
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
