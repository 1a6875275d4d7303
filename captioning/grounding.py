"""Grounded reranking: an n-best list reordered by what the model itself sees in the image.

A model trained with the scene loss (training: `--scene-loss-weight`) has a second, dense reading
of every image: a linear classifier on each cell of the encoder's grid names the object there
(size, colour and shape) or none. Its weights ship in the bundle as scene_head.npz (plain arrays,
read with allow_pickle=False, verified by the manifest like every other file). The cells that name
one kind and touch form one object, which gives a scene: which objects, how many, and where.

With `DecodeOptions(grounded=True)` a beam search's captions (all beam_size of them) are then ordered by how
many of their facts disagree with that scene (captioning/scene_checker.py: a false fact or an
unnamed object each count one; a caption outside the grammar counts most), the search's own order
breaking ties. The caption decoder and the cell classifier read the same features but make
different mistakes: the decoder names one shape twice or loses a small one while the cells still
say what is there, so the first caption of the n-best list that agrees with them is right more
often than the decoder's own first (docs/MODEL.md, "Grounded reranking"). The scene only reorders
captions the decoder wrote; it writes none.

The reading is only as good as the cells: the grammar is the shapes domain's, and a bundle
without scene_head.npz cannot rerank (Captioner.check says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from captioning.scene_checker import check_caption
from captioning.scenes import MAX_OBJECTS, SCENE_KINDS, Scene, ShapeObject

FILE = "scene_head.npz"
# The beam the reports measure grounded decoding with: on the default model's test split and its
# hardest wild variations, 3 candidates reranked did as well as 5 or 8 (docs/MODEL.md).
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
    cells with one label is one object, centred on the group's mean cell, in a frame of one unit
    per cell (relations compare shares of the frame, so its size does not matter)."""
    rows, columns = grid_shape
    labels = np.asarray(cells).reshape(rows, columns)
    seen = np.zeros_like(labels, dtype=bool)
    objects = []
    for row in range(rows):
        for column in range(columns):
            label = int(labels[row, column])
            if label == 0 or seen[row, column]:
                continue
            group, stack = [], [(row, column)]
            seen[row, column] = True
            while stack:
                r, c = stack.pop()
                group.append((r, c))
                for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                    if 0 <= nr < rows and 0 <= nc < columns and not seen[nr, nc] and labels[nr, nc] == label:
                        seen[nr, nc] = True
                        stack.append((nr, nc))
            size, colour, shape = SCENE_KINDS[label - 1]
            cy, cx = np.mean(group, axis=0) + 0.5
            objects.append(ShapeObject(shape, colour, size, float(cx), float(cy), 0.5))
    return Scene(image_size=columns, objects=tuple(objects), background="", width=columns, height=rows)


def disagreements(text: str, scene: Scene) -> int:
    """How many of the caption's facts the scene contradicts, plus the objects it leaves unnamed."""
    verdict = check_caption(text, scene)
    return len(verdict.false_facts) + len(verdict.missing) if verdict.parsed else UNPARSED


def rerank(captions: Sequence, scene: Scene) -> list:
    """Captions (captioning.decoding.Caption) ordered by disagreements with the scene, ties kept in
    their order; each marked with whether it agrees with the scene entirely.

    A reading of more than MOST_OBJECTS_READ objects (noise, a texture, a picture far from the
    domain) is no scene any caption can agree with, and checking a caption against it would take
    time exponential in the objects: the captions keep their order, none agreeing."""
    if len(scene.objects) > MOST_OBJECTS_READ:
        return [replace(caption, agrees_with_scene=False) for caption in captions]
    counted = [(disagreements(caption.text, scene), n, caption) for n, caption in enumerate(captions)]
    return [replace(caption, agrees_with_scene=count == 0) for count, _, caption in sorted(counted)]
