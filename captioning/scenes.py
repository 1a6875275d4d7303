"""The scenes of the shapes domain: what objects there are, where, and which facts about them hold.

Shared by the dataset that draws and describes them (training/datasets/shapes.py, shapes_wide.py),
the grounded checker that grades a caption against one (captioning/scene_checker.py), and the
service's grounded reranking, which reads a scene from the model's own features
(captioning/grounding.py). Pure data and geometry: no drawing, no randomness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
RELATIONS = ("to the left of", "to the right of", "above", "below")
MAX_OBJECTS = 4  # the most objects a scene holds (the grounded checker's search is exponential in them)

# A relation is *written* only when it is obvious: the centres are at least 15% of the image apart
# along the stated axis and that axis dominates. The checker *accepts* a relation on a plain
# coordinate comparison with a ~2 px dead zone (as CLEVR does), so a model is not punished for a
# true but less obvious statement.
STRICT_RELATION_OFFSET = 0.15
LENIENT_RELATION_OFFSET = 0.03


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    cx: float  # pixel centre
    cy: float
    extent: float  # half-size: the object fits in the box centre +- extent

    def describe(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    image_size: int
    objects: tuple[ShapeObject, ...]
    background: str
    width: int | None = None  # a non-square scene (shapes_wide); None: image_size x image_size
    height: int | None = None

    @property
    def frame(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return (self.width or self.image_size, self.height or self.image_size)


def relation_holds(
    a: ShapeObject, b: ShapeObject, rel: str, image_size: int | tuple[int, int], strict: bool = True
) -> bool:
    """Whether "a is REL b" holds: strict for the caption writer, lenient for the checker.
    `image_size`: the side of a square scene, or (width, height); offsets count in shares of the
    axis they lie along, so a non-square image squeezed square keeps its relations."""
    width, height = (image_size, image_size) if isinstance(image_size, (int, float)) else image_size
    dx, dy = (b.cx - a.cx) / width, (b.cy - a.cy) / height  # positive when a is left of / above b
    along, across = {
        "to the left of": (dx, dy),
        "to the right of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[rel]
    if strict:
        return along >= STRICT_RELATION_OFFSET and along > abs(across)
    return along >= LENIENT_RELATION_OFFSET


# The kinds of object a scene can hold, for scene_cells: (size, colour, shape); label 0 is "none".
SCENE_KINDS = tuple((size, colour, shape) for size in SIZES for colour in COLOURS for shape in SHAPES)


def centre_cell(obj: ShapeObject, frame: tuple[int, int], grid: int) -> tuple[int, int]:
    """(row, column) of the cell of a grid x grid division of a width x height frame that holds
    the object's centre."""
    width, height = frame
    return min(int(obj.cy / height * grid), grid - 1), min(int(obj.cx / width * grid), grid - 1)


def scene_cells(scene: Scene, grid: int) -> np.ndarray:
    """What each cell of a grid x grid division of the image shows, row by row: 1 + the index in
    SCENE_KINDS of the object whose box holds the cell's centre, else 0 (background). An object
    smaller than a cell still labels the cell of its own centre. The image is squeezed to a square
    (as the model's input is), so the grid divides width and height alike: int32 [grid * grid]."""
    width, height = scene.frame
    centres = (np.arange(grid) + 0.5) / grid
    xs, ys = centres * width, centres * height
    labels = np.zeros((grid, grid), np.int32)
    for obj in scene.objects:
        label = 1 + SCENE_KINDS.index((obj.size, obj.colour, obj.shape))
        rows = np.abs(ys - obj.cy) <= obj.extent
        columns = np.abs(xs - obj.cx) <= obj.extent
        labels[np.ix_(rows, columns)] = label
        labels[centre_cell(obj, scene.frame, grid)] = label
    return labels.ravel()


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def noun_phrase(count: int, colour: str, shape: str, size: str | None = None, one: bool = False) -> str:
    """ "a red circle", "an orange square", "one small blue cross", "two large red crosses"."""
    noun = plural(shape) if count > 1 else shape
    words = [size, colour, noun] if size else [colour, noun]
    if count > 1:
        article = NUMBER_WORDS[count]
    elif one:
        article = "one"
    else:
        article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def list_scene(scene: Scene) -> str:
    """The plainest caption of a scene of the grammar: a phrase per colour and shape, in the order
    their first objects come, no sizes and no relations, written as the model writes (lower case,
    no commas): "there is a red circle and two blue crosses"."""
    counts: dict[tuple[str, str], int] = {}
    for obj in scene.objects:
        counts[(obj.colour, obj.shape)] = counts.get((obj.colour, obj.shape), 0) + 1
    if not counts or max(counts.values()) > max(NUMBER_WORDS):
        raise ValueError(
            f"a scene of 1 to {MAX_OBJECTS} objects of a kind is listed; this one has {len(scene.objects)}"
        )
    phrases = [noun_phrase(count, colour, shape) for (colour, shape), count in counts.items()]
    listed = phrases[0] if len(phrases) == 1 else " ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"there {'is' if next(iter(counts.values())) == 1 else 'are'} {listed}"
