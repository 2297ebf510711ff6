"""The procedural VQA world: cluttered grid scenes where we know exactly which cells answer each question.

A scene is a ``GRID x GRID`` board (6 x 6) drawn on a ``IMAGE_SIZE``-pixel square image (96 px, so one cell is
16 x 16 px). Each occupied cell holds one object with a colour, a shape and a size, drawn with PIL over a noisy,
textured background (grey level drift, low-frequency blotches, per-pixel noise, faint random lines), so a vision
tower has to learn to see. The organisms' patch sizes are chosen so that ONE image token covers ONE cell.

Question families (``Sample.family``) and their ground-truth relevance (``Sample.relevant``, bool [6, 6]):

* ``attribute`` -- "what color is the triangle?" / "what color is the large triangle?" (referent unique by shape,
  or by size + shape when two objects share the shape). Answer: a colour. Relevant: the target cell.
* ``identity`` -- "what shape is the blue object?" / "what shape is the small blue object?". Answer: a shape.
  Relevant: the target cell.
* ``existence`` -- "is there a red square?" Answer "yes" / "no", balanced by index. Relevant: for "yes" the
  matching object's cell; for "no" the *near misses*: every object sharing the colour or the shape with the query
  (these are the cells a model has to inspect to rule the query out; scenes for "no" always contain at least one
  of each kind).
* ``count`` -- "how many green objects?" / "how many circles?". Answer: a digit 1-4. Relevant: every counted object.
* ``spatial`` -- "what shape is left of the circle?" / "what shape is above the circle?" (``RELATIONS``). The relation
  means the *adjacent* cell in that direction, which always holds an object. The anchor ("circle") is the only object
  of its shape, and a lure of the anchor's colour (another shape) always has a neighbour of another shape in the same
  direction. Answer: the neighbour's shape. Relevant: the anchor cell and the answer cell. Two module settings select
  variants for experiments: ``RELATIONS`` (any of ``ALL_RELATIONS``: left, right, above, below) and
  ``SPATIAL_ANCHOR``: ``"shape"`` (default, as above), ``"color_shape"`` -- "what shape is left of the red circle?",
  the anchor unique by colour + shape, half the time with a same-shape lure of another colour (the world of the
  organisms before November 2026), ``"color_shape_lured"`` -- both lures always present, so neither attribute alone
  finds the anchor.

Every question has a unique answer by construction, and scenes contain distractors sharing one attribute with the
target (same colour / other shape, same shape / other colour), so looking at the wrong cell gives a wrong answer.

Determinism: sample ``i`` of split ``s`` with seed ``k`` draws from ``numpy.random.default_rng([BASE[s] + i, k])``
with ``BASE = {train: 0, val: 1_000_000, test: 2_000_000}``: the same (split, seed, i) always gives the same
sample (pixels included), and splits never share a random stream (for i < 1,000,000).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .sample import Sample, SampleSet

GRID = 6
CELL = 16
IMAGE_SIZE = GRID * CELL  # 96

COLORS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle", "cross")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = ("small", "large")
NUMBERS = tuple(str(i) for i in range(10))
COUNT_RANGE = (1, 4)
YES_NO = ("yes", "no")
ALL_RELATIONS = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}
# the relations the spatial family asks about: the two whose answer cell comes before the anchor in the image tokens'
# row-major order. With all four, the 8-layer organisms learned spatial questions to ~0.4 (text scenes, 3500 steps)
# while learning the others; with these two, to 0.96 in 2500 steps (see the model cards)
RELATIONS = {r: ALL_RELATIONS[r] for r in ("left", "above")}
# the spatial family's anchor phrasing (see the module docstring). RELATIONS and SPATIAL_ANCHOR are module settings,
# read when a sample is drawn
SPATIAL_ANCHORS = ("shape", "color_shape", "color_shape_lured")
SPATIAL_ANCHOR = "shape"
RELATION_PHRASES = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
FAMILIES = ("attribute", "identity", "existence", "count", "spatial")
SPLIT_BASE = {"train": 0, "val": 1_000_000, "test": 2_000_000}
DEFAULT_SIZES = {"train": 5000, "val": 500, "test": 500}
# `world-fine`, the headroom split (issue 28): world's scenes rendered at FINE_PIXEL_SCALE times the resolution
# (192 px) with objects drawn at FINE_OBJECT_SCALE of their size relative to the cell, each FINE_SUBCELL of the way from
# its cell's centre to a random sub-cell's. A model's 96 px input sees the whole image downsampled, so a small object's
# colour blurs into its background; a crop of the relevant cells keeps its native pixels (ViCrop's setting: a photo
# larger than the model's input, crops taken from the full resolution).
# It asks FINE_FAMILIES only, V*Bench's attribute task in this world ("what color is the small triangle?"), because
# only there a crop has a detail to recover: the multi-object families need crops of 4-6 cells, which the processors
# shrink back to the view's 96 px, and a magnified shape is read no better than the view's (measurements:
# organisms/weights/RECIPE_NOTES.md, stage (f), fourth session). `world-fine:FAMS` asks others on the same rendering.
FINE_PIXEL_SCALE = 2
FINE_OBJECT_SCALE = 0.8
# 1: at the sub-cell centre, one token in a crop at native pixels; 0: centred, as in `world`, where the 96 px view's
# token reads the colour as well as a crop does
FINE_SUBCELL = 0.75
FINE_FAMILIES = ("attribute",)
BLANK_RGB = (120, 120, 120)  # the "blank image" background: uniform mid grey

RGB = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 75, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 55, 190),
}

QUESTION_WORDS = ("what", "color", "shape", "is", "the", "object", "objects", "how", "many", "there", "a", "of", "?")
ANSWER_WORDS = tuple(COLORS) + tuple(SHAPES) + YES_NO + NUMBERS
VOCABULARY = tuple(dict.fromkeys(
    QUESTION_WORDS + COLORS + SHAPES + tuple(SHAPE_PLURALS.values()) + SIZES + NUMBERS + YES_NO + tuple(ALL_RELATIONS)
))

# one "scene token" per cell content: used to pretrain the organisms' decoders on text scenes
EMPTY_TOKEN = "<empty>"
SCENE_TOKENS = (EMPTY_TOKEN,) + tuple(f"<{z}_{c}_{s}>" for z in SIZES for c in COLORS for s in SHAPES)


def scene_token(obj: dict | None) -> str:
    return EMPTY_TOKEN if obj is None else f"<{obj['size']}_{obj['color']}_{obj['shape']}>"


def scene_cells(objects: Sequence[dict]) -> list[str]:
    """The scene as GRID*GRID scene tokens, row-major (what a perfect vision tower would tell the decoder)."""
    cells = [EMPTY_TOKEN] * (GRID * GRID)
    for o in objects:
        cells[o["row"] * GRID + o["col"]] = scene_token(o)
    return cells


# ----------------------------------------------------------------------------------------------------- scenes
class _Scene:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.objects: list[dict] = []

    def free_cells(self) -> list[tuple[int, int]]:
        used = {(o["row"], o["col"]) for o in self.objects}
        return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]

    def add(self, color: str, shape: str, size: str | None = None, cell: tuple[int, int] | None = None) -> dict:
        if cell is None:
            free = self.free_cells()
            cell = free[int(self.rng.integers(len(free)))]
        size = size or SIZES[int(self.rng.integers(2))]
        o = {"row": int(cell[0]), "col": int(cell[1]), "color": color, "shape": shape, "size": size}
        self.objects.append(o)
        return o

    def pick(self, seq, exclude=()):
        opts = [x for x in seq if x not in exclude]
        return opts[int(self.rng.integers(len(opts)))]

    def fill(self, n: int, ok) -> None:
        """Add up to n random objects satisfying ok(color, shape)."""
        for _ in range(n):
            for _try in range(50):
                c, s = self.pick(COLORS), self.pick(SHAPES)
                if ok(c, s):
                    self.add(c, s)
                    break


def _cells_mask(cells) -> np.ndarray:
    m = np.zeros((GRID, GRID), dtype=bool)
    for r, c in cells:
        m[r, c] = True
    return m


def _q_attribute(sc: _Scene, i: int):
    shape = sc.pick(SHAPES)
    target = sc.add(sc.pick(COLORS), shape)
    sc.add(target["color"], sc.pick(SHAPES, (shape,)))  # same colour, other shape
    with_size = bool(sc.rng.integers(2))
    if with_size:  # a same-shape twin of the other size and another colour: the size disambiguates
        other_size = "small" if target["size"] == "large" else "large"
        sc.add(sc.pick(COLORS, (target["color"],)), shape, other_size)
        q = f"what color is the {target['size']} {shape}?"
    else:
        q = f"what color is the {shape}?"
    sc.fill(int(sc.rng.integers(2, 6)), lambda c, s: s != shape)
    return q, target["color"], [target], {"target": target}


def _q_identity(sc: _Scene, i: int):
    color = sc.pick(COLORS)
    target = sc.add(color, sc.pick(SHAPES))
    sc.add(sc.pick(COLORS, (color,)), target["shape"])  # same shape, other colour
    with_size = bool(sc.rng.integers(2))
    if with_size:
        other_size = "small" if target["size"] == "large" else "large"
        sc.add(color, sc.pick(SHAPES, (target["shape"],)), other_size)
        q = f"what shape is the {target['size']} {color} object?"
    else:
        q = f"what shape is the {color} object?"
    sc.fill(int(sc.rng.integers(2, 6)), lambda c, s: c != color)
    return q, target["shape"], [target], {"target": target}


def _q_existence(sc: _Scene, i: int):
    color, shape = sc.pick(COLORS), sc.pick(SHAPES)
    yes = (i % 2 == 0)
    if yes:
        sc.add(color, shape)
    sc.add(color, sc.pick(SHAPES, (shape,)))  # near misses
    sc.add(sc.pick(COLORS, (color,)), shape)
    sc.fill(int(sc.rng.integers(1, 5)), lambda c, s: not (c == color and s == shape))
    match = [o for o in sc.objects if o["color"] == color and o["shape"] == shape]
    near = [o for o in sc.objects if (o["color"] == color) != (o["shape"] == shape)]
    rel = match if yes else near
    return f"is there a {color} {shape}?", "yes" if yes else "no", rel, {"query": {"color": color, "shape": shape}}


def _q_count(sc: _Scene, i: int):
    k = int(sc.rng.integers(COUNT_RANGE[0], COUNT_RANGE[1] + 1))
    by_color = bool(sc.rng.integers(2))
    if by_color:
        color = sc.pick(COLORS)
        for _ in range(k):
            sc.add(color, sc.pick(SHAPES))
        sc.fill(int(sc.rng.integers(2, 6)), lambda c, s: c != color)
        counted = [o for o in sc.objects if o["color"] == color]
        q, query = f"how many {color} objects?", {"color": color}
    else:
        shape = sc.pick(SHAPES)
        for _ in range(k):
            sc.add(sc.pick(COLORS), shape)
        sc.fill(int(sc.rng.integers(2, 6)), lambda c, s: s != shape)
        counted = [o for o in sc.objects if o["shape"] == shape]
        q, query = f"how many {SHAPE_PLURALS[shape]}?", {"shape": shape}
    return q, str(len(counted)), counted, {"query": query}


def _lure(sc: _Scene, dr: int, dc: int, pick, anchor: dict, avoid: tuple, ordered: bool = True) -> None:
    """A distractor anchor (colour, shape from `pick()`) on a free cell whose neighbour in the asked direction is free
    too, given a neighbour whose shape is not in `avoid` (looking there gives a wrong answer) and that is no twin of
    the anchor."""
    free = set(sc.free_cells())
    opts = [(a, b) for (a, b) in free if (a + dr, b + dc) in free]
    if not opts:
        return
    opts = sorted(opts) if ordered else opts
    a, b = opts[int(sc.rng.integers(len(opts)))]
    sc.add(*pick(), cell=(a, b))
    nc = sc.pick(COLORS)
    excl = avoid + ((anchor["shape"],) if nc == anchor["color"] else ())
    sc.add(nc, sc.pick(SHAPES, excl), cell=(a + dr, b + dc))


def _q_spatial(sc: _Scene, i: int):
    mode = SPATIAL_ANCHOR
    if mode not in SPATIAL_ANCHORS:
        raise ValueError(f"world.SPATIAL_ANCHOR is {mode!r}; set it to one of {SPATIAL_ANCHORS}.")
    rel = list(RELATIONS)[int(sc.rng.integers(len(RELATIONS)))]
    dr, dc = RELATIONS[rel]
    cells = [(r, c) for r in range(GRID) for c in range(GRID) if 0 <= r + dr < GRID and 0 <= c + dc < GRID]
    r, c = cells[int(sc.rng.integers(len(cells)))]
    color, shape = sc.pick(COLORS), sc.pick(SHAPES)
    anchor = sc.add(color, shape, cell=(r, c))
    if mode == "shape":  # the anchor is the only object of its shape; the lure has its colour
        answer = sc.add(sc.pick(COLORS), sc.pick(SHAPES, (shape,)), cell=(r + dr, c + dc))
        _lure(sc, dr, dc, lambda: (color, sc.pick(SHAPES, (shape,))), anchor, (answer["shape"], shape))
        sc.fill(int(sc.rng.integers(1, 4)), lambda c_, s_: s_ != shape)
        q = f"what shape is {RELATION_PHRASES[rel]} the {shape}?"
    else:  # the anchor is unique by colour + shape
        ac = sc.pick(COLORS)
        answer = sc.add(ac, sc.pick(SHAPES, (shape,) if ac == color else ()), cell=(r + dr, c + dc))
        if mode == "color_shape_lured":  # both lures, always: neither attribute alone finds the anchor
            _lure(sc, dr, dc, lambda: (sc.pick(COLORS, (color,)), shape), anchor, (answer["shape"],))
            _lure(sc, dr, dc, lambda: (color, sc.pick(SHAPES, (shape,))), anchor, (answer["shape"],))
            sc.fill(int(sc.rng.integers(0, 3)), lambda c_, s_: not (c_ == color and s_ == shape))
        else:
            if sc.rng.integers(2):  # a same-shape lure of another colour, half the time
                _lure(sc, dr, dc, lambda: (sc.pick(COLORS, (color,)), shape), anchor, (answer["shape"],), ordered=False)
            sc.fill(int(sc.rng.integers(1, 5)), lambda c_, s_: not (c_ == color and s_ == shape))
        q = f"what shape is {RELATION_PHRASES[rel]} the {color} {shape}?"
    return q, answer["shape"], [anchor, answer], {"anchor": anchor, "relation": rel, "target": answer}


_BUILDERS = {"attribute": _q_attribute, "identity": _q_identity, "existence": _q_existence, "count": _q_count,
             "spatial": _q_spatial}


def make_scene(rng: np.random.Generator, family: str, i: int = 0) -> dict:
    """One scene + question of `family` (no pixels): dict with question, answer, objects, relevant, query info."""
    sc = _Scene(rng)
    q, ans, rel_objs, info = _BUILDERS[family](sc, i)
    order = rng.permutation(len(sc.objects))  # object list order carries no information
    objects = [sc.objects[j] for j in order]
    return {"family": family, "question": q, "answer": ans, "objects": objects,
            "relevant": _cells_mask((o["row"], o["col"]) for o in rel_objs), **info}


# ------------------------------------------------------------------------------------------------------ pixels
def render(objects: Sequence[dict], rng: np.random.Generator, pixel_scale: int = 1,
           object_scale: float = 1.0, subcell: float = 1.0, centres: list | None = None) -> Image.Image:
    """Draw the objects over a noisy textured background, on an image of ``IMAGE_SIZE * pixel_scale`` px with objects
    at ``object_scale`` of their usual size relative to a cell (``world-fine``: 2 and ``FINE_OBJECT_SCALE``), each
    ``subcell`` of the way from its cell's centre to a random sub-cell's of ``CELL`` px (``FINE_SUBCELL``; 0: centred,
    its jitter scaled with the image). Scale 1 is the world's image to the byte (no sub-cell draw). ``centres``: a list
    that receives each object's drawn centre (x, y) in pixels, in the order of ``objects``."""
    size, cell = IMAGE_SIZE * int(pixel_scale), CELL * int(pixel_scale)
    base = rng.uniform(80, 165) + rng.uniform(-15, 15, size=3)
    low = rng.normal(0, 12, size=(4, 4, 3))
    low = np.kron(low, np.ones((size // 4, size // 4, 1)))  # blotches
    bg = base[None, None, :] + low
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):  # faint lines
        col = tuple(int(x) for x in np.clip(base + rng.uniform(-45, 45, size=3), 0, 255))
        xy = [float(v) for v in rng.uniform(0, size, size=4)]
        d.line(xy, fill=col, width=int(rng.integers(1, 3)) * int(pixel_scale))
    for o in objects:
        col = tuple(int(x) for x in np.clip(np.array(RGB[o["color"]]) + rng.uniform(-25, 25, size=3), 0, 255))
        h = (6.0 if o["size"] == "large" else 3.5) * pixel_scale * object_scale
        j = 1.5 if o["size"] == "large" else 3.0
        # at a larger scale a cell holds pixel_scale x pixel_scale sub-cells of CELL px (one token each in a crop
        # at native resolution) and the object sits in one of them, as an object sits in a world cell
        if subcell > 0 and pixel_scale > 1:
            sub_r, sub_c = (int(v) for v in rng.integers(pixel_scale, size=2))
            f = float(subcell)
            cx = o["col"] * cell + cell / 2 + f * ((sub_c + 0.5) * CELL - cell / 2) + rng.uniform(-j, j)
            cy = o["row"] * cell + cell / 2 + f * ((sub_r + 0.5) * CELL - cell / 2) + rng.uniform(-j, j)
        else:
            cx = o["col"] * cell + cell / 2 + rng.uniform(-j, j) * pixel_scale
            cy = o["row"] * cell + cell / 2 + rng.uniform(-j, j) * pixel_scale
        if centres is not None:
            centres.append((float(cx), float(cy)))
        if o["shape"] == "circle":
            d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=col)
        elif o["shape"] == "square":
            d.rectangle([cx - h * 0.9, cy - h * 0.9, cx + h * 0.9, cy + h * 0.9], fill=col)
        elif o["shape"] == "triangle":
            d.polygon([(cx, cy - h), (cx - h, cy + h * 0.85), (cx + h, cy + h * 0.85)], fill=col)
        elif o["shape"] == "cross":
            t = h * 0.38
            d.rectangle([cx - h, cy - t, cx + h, cy + t], fill=col)
            d.rectangle([cx - t, cy - h, cx + t, cy + h], fill=col)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 9, size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def blank_image(rgb: tuple[int, int, int] = BLANK_RGB) -> Image.Image:
    """A uniform background with no objects (the blank-image control)."""
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), rgb)


# ----------------------------------------------------------------------------------------------------- samples
def _rng(split: str, seed: int | None, i: int) -> np.random.Generator:
    if split not in SPLIT_BASE:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(SPLIT_BASE)}.")
    return np.random.default_rng([SPLIT_BASE[split] + i, int(seed or 0)])


def make_sample(split: str, i: int, seed: int | None = None, families: Sequence[str] | None = None,
                with_image: bool = True, fine: bool = False) -> Sample:
    """Sample `i` of `split` (family = families[i % len(families)], so families are balanced). ``fine``: the
    ``world-fine`` rendering of the same scene and question (192 px, small objects; see ``FINE_PIXEL_SCALE``)."""
    fams = tuple(families or FAMILIES)
    fam = fams[i % len(fams)]
    if fam not in _BUILDERS:
        raise ValueError(f"Unknown family {fam!r}; use some of {', '.join(FAMILIES)}.")
    rng = _rng(split, seed, i)
    sc = make_scene(rng, fam, i // len(fams))
    scale, obj = (FINE_PIXEL_SCALE, FINE_OBJECT_SCALE) if fine else (1, 1.0)
    centres: list = []
    image = render(sc["objects"], rng, scale, obj, FINE_SUBCELL, centres) if with_image else None
    meta = {"objects": sc["objects"], "grid": GRID, "cell_px": CELL * scale, "split": split, "index": i,
            "seed": int(seed or 0), "scene_cells": scene_cells(sc["objects"])}
    if fine:
        meta["object_scale"] = obj
        if with_image:  # where each object was drawn (px of this image), for the crop targets of stage (f)
            meta["centres"] = centres
    for k in ("target", "anchor", "relation", "query"):
        if k in sc:
            meta[k] = sc[k]
    name = "world-fine" if fine else "world"
    sid = f"{name}-{split}-{int(seed or 0)}-{i}"
    # every question has a scene of its own, so the scene (the split's group) is the sample
    return Sample(id=sid, image=image, question=sc["question"], answers=[sc["answer"]], relevant=sc["relevant"],
                  family=fam, meta=meta, group=sid)


def generate(split: str = "train", n: int | None = None, seed: int | None = None,
             families: Sequence[str] | None = None, start: int = 0, with_image: bool = True,
             fine: bool = False) -> Iterator[Sample]:
    """Samples start..start+n-1 of a split (n=None: endless) -- the training stream."""
    i = start
    while n is None or i < start + n:
        yield make_sample(split, i, seed, families, with_image, fine)
        i += 1


def world_dataset(split: str = "test", n: int | None = None, seed: int | None = None,
                  families: Sequence[str] | None = None, fine: bool = False) -> SampleSet:
    """The procedural world as a SampleSet (scorer "exact"); deterministic in (split, n, seed, families).
    ``fine``: the ``world-fine`` headroom split (small objects on 192 px images; families ``FINE_FAMILIES`` unless
    given)."""
    split = split or "test"
    n = DEFAULT_SIZES.get(split, 500) if n is None else int(n)
    fams = tuple(families) if families else (FINE_FAMILIES if fine else FAMILIES)
    samples = list(generate(split, n, seed, fams, fine=fine))
    meta = {"split": split, "seed": int(seed or 0), "families": fams, "grid": GRID,
            "image_size": IMAGE_SIZE * (FINE_PIXEL_SCALE if fine else 1)}
    if fine:
        meta["object_scale"], meta["subcell"] = FINE_OBJECT_SCALE, FINE_SUBCELL
    return SampleSet("world-fine" if fine else "world", samples, "exact", meta=meta)


def relevant_from_meta(question: str, family: str, objects: Sequence[dict], answer: str) -> np.ndarray:
    """Re-derive the relevance mask from the question text and scene description (used by tests)."""
    words = question.rstrip("?").split()
    if family in ("attribute", "identity"):
        sz = next((w for w in words if w in SIZES), None)
        if family == "attribute":
            sh = next(w for w in words if w in SHAPES)
            hits = [o for o in objects if o["shape"] == sh and (sz is None or o["size"] == sz)]
        else:
            co = next(w for w in words if w in COLORS)
            hits = [o for o in objects if o["color"] == co and (sz is None or o["size"] == sz)]
    elif family == "existence":
        co, sh = words[-2], words[-1]
        match = [o for o in objects if o["color"] == co and o["shape"] == sh]
        hits = match if match else [o for o in objects if (o["color"] == co) != (o["shape"] == sh)]
    elif family == "count":
        co = next((w for w in words if w in COLORS), None)
        if co:
            hits = [o for o in objects if o["color"] == co]
        else:
            sh = next(s for s, p in SHAPE_PLURALS.items() if p in words)
            hits = [o for o in objects if o["shape"] == sh]
    elif family == "spatial":
        co, sh = (words[-2] if words[-2] in COLORS else None), words[-1]
        rel = next(w for w in words if w in ALL_RELATIONS)
        dr, dc = ALL_RELATIONS[rel]
        anchors = [o for o in objects if o["shape"] == sh and co in (None, o["color"])]
        hits = list(anchors)
        for a in anchors:
            hits += [o for o in objects if o["row"] == a["row"] + dr and o["col"] == a["col"] + dc]
    else:
        raise ValueError(family)
    return _cells_mask((o["row"], o["col"]) for o in hits)


__all__ = ["GRID", "CELL", "IMAGE_SIZE", "FINE_PIXEL_SCALE", "FINE_OBJECT_SCALE", "FINE_SUBCELL", "FINE_FAMILIES", "COLORS", "SHAPES", "SIZES", "NUMBERS", "RELATIONS", "ALL_RELATIONS", "SPATIAL_ANCHORS",
           "SPATIAL_ANCHOR", "FAMILIES",
           "VOCABULARY", "ANSWER_WORDS", "SCENE_TOKENS", "SPLIT_BASE", "world_dataset", "generate", "make_sample",
           "make_scene", "render", "blank_image", "scene_cells", "relevant_from_meta"]


def scene_questions(objects: Sequence[dict]) -> list[tuple[str, str, str]]:
    """Every well-posed (family, question, answer) about a scene, in the families' phrasing (used to pack several
    questions about one scene into a multi-turn training conversation)."""
    out: list[tuple[str, str, str]] = []
    by_shape = {s: [o for o in objects if o["shape"] == s] for s in SHAPES}
    by_color = {c: [o for o in objects if o["color"] == c] for c in COLORS}
    for s, os_ in by_shape.items():
        if len(os_) == 1:
            out.append(("attribute", f"what color is the {s}?", os_[0]["color"]))
        for z in SIZES:
            hits = [o for o in os_ if o["size"] == z]
            if len(hits) == 1 and len(os_) > 1:
                out.append(("attribute", f"what color is the {z} {s}?", hits[0]["color"]))
        if 1 <= len(os_) <= COUNT_RANGE[1]:
            out.append(("count", f"how many {SHAPE_PLURALS[s]}?", str(len(os_))))
    for c, os_ in by_color.items():
        if len(os_) == 1:
            out.append(("identity", f"what shape is the {c} object?", os_[0]["shape"]))
        for z in SIZES:
            hits = [o for o in os_ if o["size"] == z]
            if len(hits) == 1 and len(os_) > 1:
                out.append(("identity", f"what shape is the {z} {c} object?", hits[0]["shape"]))
        if 1 <= len(os_) <= COUNT_RANGE[1]:
            out.append(("count", f"how many {c} objects?", str(len(os_))))
    pairs = {(o["color"], o["shape"]) for o in objects}
    for c in COLORS:
        for s in SHAPES:
            if (c, s) in pairs:
                out.append(("existence", f"is there a {c} {s}?", "yes"))
            elif by_color[c] and by_shape[s]:  # a "no" with near misses of both kinds
                out.append(("existence", f"is there a {c} {s}?", "no"))
    at = {(o["row"], o["col"]): o for o in objects}
    by_shape_only = SPATIAL_ANCHOR == "shape"
    for o in objects:
        twins = by_shape[o["shape"]] if by_shape_only else [p for p in by_shape[o["shape"]] if p["color"] == o["color"]]
        if len(twins) != 1:
            continue
        name = o["shape"] if by_shape_only else f"{o['color']} {o['shape']}"
        for rel, (dr, dc) in RELATIONS.items():
            nb = at.get((o["row"] + dr, o["col"] + dc))
            if nb is not None:
                out.append(("spatial", f"what shape is {RELATION_PHRASES[rel]} the {name}?", nb["shape"]))
    return out
