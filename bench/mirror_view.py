"""What the mirror view costs and buys: greedy decoding with and without it, in process.

    python -m bench.mirror_view [--artifacts model_artifacts/default/7] [--images 512] [--rounds 3]

`Captioner.caption` with the service's encoder (ENCODER_PRECISION resolved as the service resolves
it) on the same shapes test images at batch 32, the two settings taking turns for
`--rounds` rounds (this machine is shared: only an interleaved comparison means something), then
the grounded accuracy of each on those images. Prints one table: captions/s and CPU ms per caption
(medians over the rounds), grounded accuracy. The per-variation accuracy is
`python -m training evaluate-wild --mirror-view` (docs/MODEL.md, section 3).
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.harness import DEFAULT_BUNDLE, encoder_like_the_service
from captioning.decoding import DecodeOptions


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mirror_view", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--images", type=int, default=512, help="shapes_wide test images")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    precision = encoder_like_the_service({})  # before TensorFlow loads: the oneDNN switch goes with it
    from captioning.captioner import Captioner
    from training.calibrate import grade
    from training.datasets.shapes_wide import load_wide_split
    from training.evaluate import record_input

    captioner = Captioner.load(args.artifacts, encoder_precision=precision)
    captioner.warmup()
    records = load_wide_split("test", args.images)
    images = [record_input(captioner, record) for record in records]
    settings = {"greedy": DecodeOptions(), "greedy, mirror_view": DecodeOptions(mirror_view=True)}
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
    answers = {}
    for _ in range(args.rounds):
        for name, options in settings.items():
            cpu, wall = time.process_time(), time.perf_counter()
            answers[name] = captioner.caption(images, options, batch_size=32)
            timings[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    print(f"{len(images)} images, batch 32, median of {args.rounds} interleaved rounds\n")
    print("| decoding | captions/s | CPU ms per caption | grounded accuracy |\n|---|---:|---:|---:|")
    for name in settings:
        wall = statistics.median(t for t, _ in timings[name])
        cpu = statistics.median(c for _, c in timings[name])
        accuracy = grade([best[0].text for best in answers[name]], records).mean()
        print(f"| {name} | {len(images) / wall:.0f} | {cpu / len(images) * 1e3:.2f} | {accuracy:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
