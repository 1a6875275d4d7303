"""Grounded reranking: an n-best list reordered by what the model itself sees in the image.

A model trained with the scene loss (training: `--scene-loss-weight`) has a second, dense reading
of every image: a linear classifier on each cell of the encoder's grid names the object there
(size, colour and shape) or none. Its weights ship in the bundle as scene_head.npz (plain arrays,
read with allow_pickle=False, verified by the manifest like every other file). The cells that name
one size and colour and touch form one object, which gives a scene: which objects, how many, and
where (with an object reader, each one's shape is then read again from the pixels:
captioning/object_reader.py).

With `DecodeOptions(grounded=True)` a beam search's captions (all beam_size of them) are then ordered by how
many of their facts disagree with that scene (captioning/scene_checker.py: a false fact or an
unnamed object each count one; a caption outside the grammar counts most), the search's own order
breaking ties. The caption decoder and the cell classifier read the same features but make
different mistakes: the decoder names one shape twice or loses a small one while the cells still
say what is there, so the first caption of the n-best list that agrees with them is right more
often than the decoder's own first (docs/MODEL.md, "Grounded reranking"). The scene mostly
reorders captions the decoder wrote. It writes one only where no candidate agrees with it but the
best names the same objects by colour, so that the two differ on a shape or a size, where the
reading is right more often (`written_caption`).

The reading is only as good as the cells: the grammar is the shapes domain's, and a bundle
without scene_head.npz cannot rerank (Captioner.check says so).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from captioning.decoding import Caption
from captioning.scene_checker import check_caption, parse_caption
from captioning.scenes import MAX_OBJECTS, SCENE_KINDS, Scene, ShapeObject, list_scene

FILE = "scene_head.npz"
# The beam the reports measure grounded decoding with: on the default model's test split and its
# hardest wild variations, 3 candidates reranked did as well as 5 or 8 (docs/MODEL-EXPERIMENTS.md).
BEAM_SIZE = 3
UNPARSED = 100  # what a caption outside the grammar counts: more than any parsed one can disagree
# A reading of a scene of the grammar (at most MAX_OBJECTS objects) can split an object in two, and
# reranking still helps such readings; beyond six objects it is not a scene, and the checker's search,
# exponential in the objects a caption's phrases match, is not run (at six: at most about 0.1 s for a
# caption of four phrases that all match every object; milliseconds for a caption the model writes).
MOST_OBJECTS_READ = MAX_OBJECTS + 2


@dataclass(frozen=True)
class SceneHead:
    """The cell classifier: features [N, D] @ weights [D, K] + bias [K] -> label per cell, 0 for
    background, else 1 + the index of the object kind in captioning.scenes.SCENE_KINDS."""

    weights: np.ndarray
    bias: np.ndarray

    def __post_init__(self):
        classes = 1 + len(SCENE_KINDS)
        if self.weights.ndim != 2 or self.weights.shape[1] != classes or self.bias.shape != (classes,):
            raise ValueError(
                f"a scene head maps features to {classes} classes; got weights {self.weights.shape}, "
                f"bias {self.bias.shape}"
            )

    @property
    def feature_size(self) -> int:
        return int(self.weights.shape[0])

    def save(self, path: str | Path) -> None:
        kinds = np.array([" ".join(kind) for kind in SCENE_KINDS])
        with open(path, "wb") as file:  # np.savez would add ".npz" to a path without it
            np.savez(file, weights=self.weights.astype(np.float32), bias=self.bias.astype(np.float32), kinds=kinds)

    @classmethod
    def load(cls, path: str | Path) -> SceneHead:
        """ValueError when the file is not a scene head of this grammar's kinds."""
        with np.load(path, allow_pickle=False) as data:
            kinds = tuple(tuple(str(kind).split()) for kind in data["kinds"])
            if kinds != SCENE_KINDS:
                raise ValueError(f"{path}: the scene head names other object kinds than this grammar's")
            return cls(np.asarray(data["weights"], np.float32), np.asarray(data["bias"], np.float32))


def read_scene(cells: np.ndarray, grid_shape: tuple[int, int]) -> Scene:
    """Cell labels [rows * columns] (SceneHead) -> the scene they show: each 4-connected group of
    cells naming one size and colour is one object, of the shape most of its cells name (a tie goes
    to the shape met first in the group's search), centred on the group's mean cell, in a frame of
    one unit per cell (relations compare shares of the frame, so its size does not matter).

    Grouping by size and colour, not by the whole label: the cells of one small object in a
    compressed or low-resolution picture often disagree on its shape, and a group per label read
    such an object as two or three (docs/MODEL.md, "Reading the cells, and captions written from
    the reading")."""
    rows, columns = grid_shape
    labels = np.asarray(cells).reshape(rows, columns)
    kinds = [None] + list(SCENE_KINDS)
    seen = np.zeros_like(labels, dtype=bool)
    objects = []
    for row in range(rows):
        for column in range(columns):
            if labels[row, column] == 0 or seen[row, column]:
                continue
            size, colour, _ = kinds[labels[row, column]]
            group, shapes, stack = [], Counter(), [(row, column)]
            seen[row, column] = True
            while stack:
                r, c = stack.pop()
                group.append((r, c))
                shapes[kinds[labels[r, c]][2]] += 1
                for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                    inside = 0 <= nr < rows and 0 <= nc < columns
                    if (
                        inside
                        and not seen[nr, nc]
                        and labels[nr, nc] != 0
                        and kinds[labels[nr, nc]][:2] == (size, colour)
                    ):
                        seen[nr, nc] = True
                        stack.append((nr, nc))
            cy, cx = np.mean(group, axis=0) + 0.5
            objects.append(ShapeObject(shapes.most_common(1)[0][0], colour, size, float(cx), float(cy), 0.5))
    return Scene(image_size=columns, objects=tuple(objects), background="", width=columns, height=rows)


def disagreements(text: str, scene: Scene) -> int:
    """How many of the caption's facts the scene contradicts, plus the objects it leaves unnamed."""
    verdict = check_caption(text, scene)
    return len(verdict.false_facts) + len(verdict.missing) if verdict.parsed else UNPARSED


def rerank(captions: Sequence, scene: Scene, words: tuple[int, int] | None = None) -> list:
    """Captions (captioning.decoding.Caption) ordered by disagreements with the scene, ties kept in
    their order; each marked with whether it agrees with the scene entirely. When none agrees, a
    caption written from the scene may go first (`written_caption`); `words` (fewest, most) bound
    its length as the search's options bound the decoder's.

    A reading of more than MOST_OBJECTS_READ objects (noise, a texture, a picture far from the
    domain) is no scene any caption can agree with, and checking a caption against it would take
    time exponential in the objects: the captions keep their order, none agreeing."""
    if len(scene.objects) > MOST_OBJECTS_READ:
        return [replace(caption, agrees_with_scene=False) for caption in captions]
    counted = [(disagreements(caption.text, scene), n, caption) for n, caption in enumerate(captions)]
    ranked = [replace(caption, agrees_with_scene=count == 0) for count, _, caption in sorted(counted)]
    if ranked and not ranked[0].agrees_with_scene:
        written = written_caption(ranked[0], scene, words)
        if written is not None:
            ranked.insert(0, written)
    return ranked


def written_caption(best, scene: Scene, words: tuple[int, int] | None = None):
    """The scene listed as a caption (captioning.scenes.list_scene), to go before `best`, the
    candidate that disagrees with it least, when both name the same objects: as many of each
    colour. They then differ on what shape (or size) an object is, or only on a relation, which
    the reading judges from coarse cell centres and the written caption leaves out. On shapes the
    reading, which the object reader took from each object's own pixels, is right more often than
    the decoder (docs/MODEL.md, "Reading the cells, and captions written from the reading"). Where
    they differ on which objects there are, the decoder is right more often: nothing is written
    (None).

    The decoder did not write it: its log_prob is None and it has no attention. Its confidence is
    `best`'s, which calibration then maps by the fit of a first caption none of whose candidates
    agreed (training/calibrate.py fits that group with these captions in it)."""
    if not 0 < len(scene.objects) <= MAX_OBJECTS:
        return None
    try:
        named = parse_caption(best.text).phrases
    except ValueError:
        return None
    colours = Counter(phrase.colour for phrase in named for _ in range(phrase.count))
    if colours != Counter(obj.colour for obj in scene.objects):
        return None
    text = list_scene(scene)  # at most MAX_OBJECTS objects: the grammar counts them all
    tokens = text.split()
    fewest, most = words or (0, None)
    if len(tokens) < fewest or (most is not None and len(tokens) > most):
        return None
    return Caption(text, tokens, None, best.confidence, agrees_with_scene=True, written_from_scene=True)
