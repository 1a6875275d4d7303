"""Greedy decoding of an image and its mirror together: what a flip ensemble would buy the default model.

    python -m bench.flip_ensemble --artifacts model_artifacts/default/3 [--images 1000] [--per-variation 200]

Each step runs the decoder on both views (the image and its left-right mirror, each with its own
features), averages their next-token log-probabilities (the mirror's with "left" and "right"
swapped, so both views speak of the same scene) and feeds the chosen token to both. The shapes in
this domain look the same mirrored, so the mirror is a second look at the same objects. It costs
two encoder images and two decoder rows per caption; the service does not offer it (yet): this
measures grounded accuracy with and without it on the test and validation splits and every wild
variation (docs/MODEL.md, section 3).
"""

from __future__ import annotations

import argparse

import numpy as np

from captioning.captioner import Captioner
from captioning.decoding import DecodeOptions
from captioning.tokenizer import END_ID, START_ID
from training.data import mirror_ids


def mirror_permutation(tokenizer) -> np.ndarray:
    """Vocabulary index -> the index of the word a mirror turns it into (itself for most words):
    the pairs training's flip swaps (training.data.MIRRORED_WORDS)."""
    permutation = np.arange(len(tokenizer))
    for a, b in mirror_ids(tokenizer):
        permutation[a], permutation[b] = b, a
    return permutation


def flip_ensemble_captions(captioner: Captioner, images: np.ndarray, slots=None) -> list[str]:
    """Greedy captions of uint8 images [B, S, S, 3], each decoded with its mirror; `slots` (a
    captioner.feature_slots(), at least 2B of them) can be reused from call to call."""
    count = len(images)
    permutation = mirror_permutation(captioner.tokenizer)
    slots = slots or captioner.feature_slots(2 * count)
    slots.encode(np.concatenate([images, images[:, :, ::-1]]), np.arange(2 * count))
    rows = np.arange(2 * count, dtype=np.int32)
    tokens = np.full(2 * count, START_ID, np.int32)
    state = np.zeros((2 * count, captioner.state_size), np.float32)
    words: list[list[int]] = [[] for _ in range(count)]
    finished = np.zeros(count, bool)
    for _ in range(captioner.max_steps(DecodeOptions())):
        log_probs, state, _ = slots.step(rows, tokens, state)
        scores = (log_probs[:count] + log_probs[count:][:, permutation]) / 2
        empty = [not w for w in words]
        scores[empty, END_ID] = -np.inf  # min_length 1, as greedy decoding has
        chosen = scores.argmax(axis=1).astype(np.int32)
        for index, token in enumerate(chosen):
            if not finished[index]:
                finished[index] = token == END_ID
                if not finished[index]:
                    words[index].append(int(token))
        if finished.all():
            break
        tokens = np.concatenate([chosen, permutation[chosen]]).astype(np.int32)
    return [" ".join(captioner.tokenizer.decode(w)) for w in words]


def compare(captioner: Captioner, records) -> tuple[np.ndarray, np.ndarray]:
    """Per record: (greedy right, flip ensemble right), as graded by the shapes checker."""
    from training.calibrate import grade
    from training.evaluate import load_record_image

    greedy, ensemble, slots = [], [], captioner.feature_slots(32)
    for start in range(0, len(records), 16):
        images = np.stack([captioner.prepare(load_record_image(r)) for r in records[start : start + 16]])
        greedy += [best[0].text for best in captioner.caption(list(images))]
        ensemble += flip_ensemble_captions(captioner, images, slots)
    return grade(greedy, records), grade(ensemble, records)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flip_ensemble", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", default="model_artifacts/default/3")
    parser.add_argument("--images", type=int, default=1000, help="images of the test and validation splits")
    parser.add_argument("--per-variation", type=int, default=200, help="images of each wild variation")
    args = parser.parse_args()
    from training.datasets.shapes_wide import VARIATIONS, load_wide_split

    captioner = Captioner.load(args.artifacts)
    sets = [("test split", load_wide_split("test", args.images))]
    sets += [("validation split", load_wide_split("val", args.images))]
    sets += [(f"wild: {name}", load_wide_split("test", args.per_variation, variation=name)) for name in VARIATIONS]
    print("| set | images | greedy | flip ensemble | fixed | broken |\n|---|---:|---:|---:|---:|---:|")
    wild = []
    for name, records in sets:
        greedy, ensemble = compare(captioner, records)
        if name.startswith("wild"):
            wild.append((greedy, ensemble))
        fixed, broken = int(((ensemble == 1) & (greedy == 0)).sum()), int(((ensemble == 0) & (greedy == 1)).sum())
        row = f"| {name} | {len(records)} | {greedy.mean():.3f} | {ensemble.mean():.3f} | {fixed} | {broken} |"
        print(row, flush=True)
    greedy, ensemble = (np.concatenate(parts) for parts in zip(*wild))
    print(f"| wild: all variations | {len(greedy)} | {greedy.mean():.3f} | {ensemble.mean():.3f} | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
