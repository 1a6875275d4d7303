"""Does unloading a model version give its memory back? RSS over repeated swaps, in one process.

    python -m bench.unload_rss [--bundle model_artifacts/default/1] [--swaps 8] [--no-jit]

Two versions of the same bundle in a temporary repository; the ModelManager swaps between them
(pin 1, pin 2, ...), each swap loading and warming one version and unloading the other. Prints
RSS after each swap and whether the unloaded Captioner was garbage-collected. --no-jit compiles
the decoder step without XLA, to separate XLA's compilation cache from everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import re
import shutil
import sys
import tempfile
import weakref
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


async def swaps(bundle: Path, count: int) -> None:
    from app.model_repository import ModelManager, VersionPolicy
    from app.settings import Settings

    root = Path(tempfile.mkdtemp(prefix="unload-rss-"))
    for version in (1, 2):
        shutil.copytree(bundle, root / "default" / str(version))
    models = ModelManager(Settings(model_repository=root, model_version_policy="specific:1"))
    await models.start()
    print(f"version 1 loaded: RSS {rss_mib():7.1f} MiB")
    try:
        for swap in range(count):
            old = weakref.ref(models.default.captioner)
            await models.reload(VersionPolicy.parse(f"specific:{2 - swap % 2}"))
            await models.wait_unloaded()
            gc.collect()
            print(
                f"swap {swap + 1} (now {models.default.version}): RSS {rss_mib():7.1f} MiB, "
                f"unloaded captioner collected: {old() is None}"
            )
    finally:
        await models.stop(1)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.unload_rss", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "model_artifacts" / "default" / "1")
    parser.add_argument("--swaps", type=int, default=8)
    parser.add_argument("--no-jit", action="store_true", help="compile the decoder step without XLA")
    args = parser.parse_args(argv)
    if args.no_jit:
        import tensorflow as tf

        compile_function = tf.function

        def without_xla(*positional, **options):
            options.pop("jit_compile", None)
            return compile_function(*positional, **options)

        tf.function = without_xla  # before captioning.captioner defines its functions
    asyncio.run(swaps(args.bundle, args.swaps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
