"""The procedural world: determinism, disjoint splits, exact relevance masks, answers in the organisms' vocabulary."""
import dataclasses
import re

import numpy as np
import pytest

from fusion_utils.data import load_dataset
from fusion_utils.data import world
from fusion_utils.data.sample import SampleSet


@pytest.fixture(scope="module")
def test_set():
    return world.world_dataset("test", 150)


def test_dataset_shape(test_set):
    assert isinstance(test_set, SampleSet) and test_set.name == "world" and test_set.scorer == "exact"
    assert len(test_set) == 150
    assert len(world.world_dataset("test")) == 500  # default size
    s = test_set[0]
    assert s.image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and s.image.mode == "RGB"
    assert s.relevant.shape == (world.GRID, world.GRID) and s.relevant.dtype == bool
    assert {x.family for x in test_set} == set(world.FAMILIES)
    assert all(len(x.answers) == 1 and x.answers[0] == x.answers[0].strip().lower() and " " not in x.answers[0]
               for x in test_set)


def test_load_dataset_dispatch():
    ds = load_dataset("world", split="val", n=10)
    assert ds.name == "world" and len(ds) == 10
    ds = load_dataset("world:count,spatial", n=6)
    assert {s.family for s in ds} == {"count", "spatial"}


def test_deterministic(test_set):
    again = world.world_dataset("test", 150)
    assert again.fingerprint() == test_set.fingerprint()
    for a, b in zip(test_set, again):
        assert a.id == b.id and a.question == b.question and a.answers == b.answers
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert np.array_equal(a.relevant, b.relevant) and a.meta == b.meta
    other_seed = world.world_dataset("test", 20, seed=1)
    assert other_seed.fingerprint() != test_set[:20].fingerprint()


def test_splits_disjoint():
    sets = {sp: world.world_dataset(sp, 60) for sp in ("train", "val", "test")}
    keys = {sp: {(s.question, tuple(map(tuple, (sorted((o["row"], o["col"], o["color"], o["shape"], o["size"])
                                                     for o in s.meta["objects"])))))
                 for s in ds} for sp, ds in sets.items()}
    pix = {sp: {np.asarray(s.image).tobytes() for s in ds} for sp, ds in sets.items()}
    for a in keys:
        for b in keys:
            if a < b:
                assert not keys[a] & keys[b], (a, b)
                assert not pix[a] & pix[b], (a, b)
    assert len({s.id for ds in sets.values() for s in ds}) == 180


def _derive(s):
    """Independent re-derivation of the answer and the relevant cells from the question text and meta['objects']."""
    objs = s.meta["objects"]
    q = s.question
    cells = lambda os: {(o["row"], o["col"]) for o in os}  # noqa: E731
    if s.family == "attribute":
        m = re.fullmatch(r"what color is the (?:(small|large) )?(\w+)\?", q)
        hits = [o for o in objs if o["shape"] == m[2] and m[1] in (None, o["size"])]
        assert len(hits) == 1
        return hits[0]["color"], cells(hits)
    if s.family == "identity":
        m = re.fullmatch(r"what shape is the (?:(small|large) )?(\w+) object\?", q)
        hits = [o for o in objs if o["color"] == m[2] and m[1] in (None, o["size"])]
        assert len(hits) == 1
        return hits[0]["shape"], cells(hits)
    if s.family == "existence":
        m = re.fullmatch(r"is there a (\w+) (\w+)\?", q)
        match = [o for o in objs if o["color"] == m[1] and o["shape"] == m[2]]
        if match:
            return "yes", cells(match)
        near = [o for o in objs if (o["color"] == m[1]) ^ (o["shape"] == m[2])]
        assert any(o["color"] == m[1] for o in near) and any(o["shape"] == m[2] for o in near)
        return "no", cells(near)
    if s.family == "count":
        m = re.fullmatch(r"how many (\w+) objects\?", q)
        if m:
            hits = [o for o in objs if o["color"] == m[1]]
        else:
            m = re.fullmatch(r"how many (\w+)\?", q)
            hits = [o for o in objs if world.SHAPE_PLURALS[o["shape"]] == m[1]]
        assert 1 <= len(hits) <= 4
        return str(len(hits)), cells(hits)
    if s.family == "spatial":
        m = re.fullmatch(r"what shape is (left of|right of|above|below) the (?:(\w+) )?(\w+)\?", q)
        dr, dc = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}[m[1]]
        anchors = [o for o in objs if o["shape"] == m[3] and m[2] in (None, o["color"])]
        assert len(anchors) == 1
        a = anchors[0]
        nb = [o for o in objs if (o["row"], o["col"]) == (a["row"] + dr, a["col"] + dc)]
        assert len(nb) == 1
        return nb[0]["shape"], cells(anchors + nb)
    raise AssertionError(s.family)


def test_masks_and_answers_rederived(test_set):
    for s in list(test_set) + list(world.world_dataset("train", 100)):
        ans, cells = _derive(s)
        assert ans == s.answers[0], (s.question, s.meta["objects"])
        assert {tuple(map(int, rc)) for rc in np.argwhere(s.relevant)} == cells, s.question
        assert np.array_equal(world.relevant_from_meta(s.question, s.family, s.meta["objects"], ans), s.relevant)
        occupied = {(o["row"], o["col"]) for o in s.meta["objects"]}
        assert len(occupied) == len(s.meta["objects"])  # one object per cell
        assert s.meta["scene_cells"] == world.scene_cells(s.meta["objects"])


@pytest.mark.parametrize("mode", world.SPATIAL_ANCHORS)
def test_spatial_anchor_variants(mode, monkeypatch):
    """Every spatial variant: answers and masks re-derived from the question text, scene_questions well posed, and
    its lures present: "shape" -- a lure of the anchor's colour (another shape) in every scene; "color_shape_lured" --
    a lure sharing the colour and one sharing the shape in every scene; "color_shape" -- a same-shape lure in about
    half. Each lure's neighbour in the asked direction holds another shape than the answer."""
    monkeypatch.setattr(world, "SPATIAL_ANCHOR", mode)
    samples = [world.make_sample("test", i, families=["spatial"], with_image=False) for i in range(200)]
    kinds = {"color": 0, "shape": 0}
    for s in samples:
        ans, cells = _derive(s)
        assert ans == s.answers[0] and {tuple(map(int, rc)) for rc in np.argwhere(s.relevant)} == cells, s.question
        assert (s.question.rstrip("?").split()[-2] in world.COLORS) == (mode != "shape")  # "...the (red) circle?"
        for f, q, a in world.scene_questions(s.meta["objects"]):
            if f == "spatial":
                assert _derive(dataclasses.replace(s, question=q, answers=[a]))[0] == a
        a, t = s.meta["anchor"], s.meta["target"]
        dr, dc = world.RELATIONS[s.meta["relation"]]
        at = {(o["row"], o["col"]): o for o in s.meta["objects"]}
        for kind in kinds:
            lures = [o for o in s.meta["objects"] if o is not a and (o[kind] == a[kind]) and (o["row"] + dr, o["col"] + dc)
                     in at and at[(o["row"] + dr, o["col"] + dc)]["shape"] != t["shape"]]
            kinds[kind] += bool(lures)
    want = {"shape": ({"color"}, set()), "color_shape_lured": ({"color", "shape"}, set()),
            "color_shape": (set(), {"shape"})}[mode]
    for kind in want[0]:
        assert kinds[kind] >= 190, (mode, kinds)
    for kind in want[1]:
        assert 70 <= kinds[kind] <= 130, (mode, kinds)
    monkeypatch.setattr(world, "SPATIAL_ANCHOR", "colour")
    with pytest.raises(ValueError, match="SPATIAL_ANCHOR"):
        world.make_sample("test", 0, families=["spatial"], with_image=False)


def test_shipped_spatial_family():
    """The organisms' spatial family: "left of" and "above" only, the anchor named by its shape alone; both relations
    are asked and the answer cell comes before the anchor in the image tokens' row-major order. All four relation
    words stay in the vocabulary, so a world with RELATIONS = ALL_RELATIONS tokenizes too."""
    assert world.SPATIAL_ANCHOR == "shape" and list(world.RELATIONS) == ["left", "above"]
    samples = [world.make_sample("test", i, families=["spatial"], with_image=False) for i in range(100)]
    assert {s.meta["relation"] for s in samples} == {"left", "above"}
    for s in samples:
        a, t = s.meta["anchor"], s.meta["target"]
        assert t["row"] * world.GRID + t["col"] < a["row"] * world.GRID + a["col"]
        assert s.question == f"what shape is {world.RELATION_PHRASES[s.meta['relation']]} the {a['shape']}?"
    assert set(world.ALL_RELATIONS) <= set(world.VOCABULARY)


def test_balance(test_set):
    ex = [s.answers[0] for s in world.world_dataset("test", 200, families=["existence"])]
    assert ex.count("yes") == ex.count("no") == 100
    counts = {s.answers[0] for s in world.world_dataset("test", 80, families=["count"])}
    assert counts == {"1", "2", "3", "4"}


def test_objects_are_drawn(test_set):
    """Occupied cells differ from the background more than empty ones (pixels carry the scene)."""
    s = test_set[0]
    arr = np.asarray(s.image).astype(float)
    sat = arr.max(-1) - arr.min(-1)  # objects are saturated, the background is near grey
    per_cell = sat.reshape(world.GRID, world.CELL, world.GRID, world.CELL).transpose(0, 2, 1, 3).reshape(
        world.GRID, world.GRID, -1)
    score = np.quantile(per_cell, 0.9, axis=-1)
    occ = np.zeros((world.GRID, world.GRID), bool)
    for o in s.meta["objects"]:
        occ[o["row"], o["col"]] = True
    assert score[occ].min() > score[~occ].max() * 0.9 or score[occ].mean() > 2 * score[~occ].mean()
    assert np.asarray(world.blank_image()).std() == 0


def test_answers_in_tokenizer_vocab(test_set):
    from fusion_utils.organisms.build import build_tokenizer

    for name in ("llava", "qwen2_vl"):
        tok = build_tokenizer(name)
        vocab = tok.get_vocab()
        for w in set(world.ANSWER_WORDS) | {s.answers[0] for s in test_set}:
            assert w in vocab, (name, w)
        for s in test_set[:30]:
            ids = tok(s.question, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, s.question


# ------------------------------------------------------------------------------------ world-fine (issue 28)
@pytest.fixture(scope="module")
def fine_set():
    return world.world_dataset("test", 40, fine=True)


def test_world_fine_is_deterministic_and_pairs_the_world(fine_set):
    """Same seed, same pixels; another seed, other pixels; the same scenes, questions and relevance as `world` asked
    in world-fine's families (attribute only by default), drawn on 192 px images; loadable by name, with families."""
    again = load_dataset("world-fine", n=40)
    assert fine_set.name == again.name == "world-fine" and again.fingerprint() == fine_set.fingerprint()
    assert {s.family for s in fine_set} == set(world.FINE_FAMILIES) == {"attribute"}
    twin = world.world_dataset("test", 40, families=world.FINE_FAMILIES)
    for a, b, w in zip(fine_set, again, twin):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert a.image.size == (2 * world.IMAGE_SIZE,) * 2 == (world.IMAGE_SIZE * world.FINE_PIXEL_SCALE,) * 2
        assert a.id == w.id.replace("world-", "world-fine-", 1) and a.question == w.question
        assert a.answers == w.answers and np.array_equal(a.relevant, w.relevant)
        assert a.meta["objects"] == w.meta["objects"] and a.meta["cell_px"] == 2 * world.CELL
    other = world.world_dataset("test", 5, seed=1, fine=True)
    assert not any(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(other, fine_set))
    assert {s.family for s in load_dataset("world-fine:count,spatial", n=6)} == {"count", "spatial"}
    assert load_dataset("world-fine:count", n=2)[0].id.startswith("world-fine-test-")


def test_world_fine_relevance_masks_and_small_objects(fine_set):
    """The masks are re-derived from the question text and scene, and each relevant object's pixels are inside the
    relevant crop box of the 192 px image (so the crop shows them at native resolution); objects are drawn smaller:
    each occupied cell differs from its background over fewer pixels than in `world` (about FINE_OBJECT_SCALE² of
    them: the same cell, objects at 0.8 of the size)."""
    from fusion_utils.data.second_images import relevant_box

    def ink(img, cell, o):  # pixels of the object's cell far from the cell's border median (the object's paint)
        a = np.asarray(img).astype(float)[o["row"] * cell:(o["row"] + 1) * cell, o["col"] * cell:(o["col"] + 1) * cell]
        bg = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
        return float((np.abs(a - bg).sum(-1) > 90).mean())

    share = {"world": [], "fine": []}
    for s in fine_set:
        assert np.array_equal(s.relevant, world.relevant_from_meta(s.question, s.family, s.meta["objects"],
                                                                   s.answers[0]))
        left, top, right, bottom = relevant_box(s)
        cell = s.meta["cell_px"]
        for o in s.meta["objects"]:
            if s.relevant[o["row"], o["col"]]:
                assert left <= o["col"] * cell and (o["col"] + 1) * cell <= right
                assert top <= o["row"] * cell and (o["row"] + 1) * cell <= bottom
        w = world.make_sample("test", s.meta["index"], families=world.FINE_FAMILIES)
        for o in s.meta["objects"]:
            if o["size"] == "large":
                share["fine"].append(ink(s.image, cell, o))
                share["world"].append(ink(w.image, world.CELL, o))
    ratio = np.mean(share["fine"]) / np.mean(share["world"])
    assert ratio < 0.75, {k: np.mean(v) for k, v in share.items()}


def test_world_pixels_unchanged_by_the_fine_renderer():
    """`render` at scale 1 is the world's image to the byte (the pinned run records and the organisms' training
    depend on it): a digest of the first test images, as before world-fine existed."""
    import hashlib

    h = hashlib.sha256()
    for s in world.world_dataset("test", 30, seed=3):
        h.update(s.image.tobytes())
        h.update(s.question.encode())
    assert h.hexdigest() == "9717c9c23d45a6341349a84d193a1d118ddb7e1f167fd6a0e0e5095a5877ce0c"


def test_random_second_image_scales_with_the_image(fine_set):
    """The 'random' second image is a cell-aligned box of the image it crops, on a world-fine image too."""
    from fusion_utils.data.second_images import images_for

    for s in fine_set[:10]:
        _, crop = images_for(s, "random", np.random.default_rng(0))
        w, h = crop.size
        assert w % (2 * world.CELL) == 0 and h % (2 * world.CELL) == 0 and 2 <= w // (2 * world.CELL) <= 5


def test_world_fine_subcell_offset_moves_objects(monkeypatch):
    """`FINE_SUBCELL` places each object between its cell's centre (0, where the 96 px view's token reads it, as in
    `world`) and a random sub-cell's centre (1: one token in a crop at native pixels; the default, 0.75, is between);
    0 moves every large object back to its cell's centre."""
    def offsets(sub):
        monkeypatch.setattr(world, "FINE_SUBCELL", sub)
        out = []
        for i in range(12):
            s = world.make_sample("test", i, fine=True)
            a, cell = np.asarray(s.image).astype(float), s.meta["cell_px"]
            for o in s.meta["objects"]:
                if o["size"] != "large":
                    continue
                c = a[o["row"] * cell:(o["row"] + 1) * cell, o["col"] * cell:(o["col"] + 1) * cell]
                bg = np.median(np.concatenate([c[0], c[-1], c[:, 0], c[:, -1]]), axis=0)
                ys, xs = np.nonzero(np.abs(c - bg).sum(-1) > 90)
                if len(xs) > 10:
                    out.append((abs(xs.mean() + 0.5 - cell / 2), abs(ys.mean() + 0.5 - cell / 2)))
        return np.array(out)

    centred, sub = offsets(0.0), offsets(1.0)
    assert len(centred) > 10 and len(sub) > 10
    assert np.median(centred) < 3.5 and np.median(sub) > 5.5, (np.median(centred), np.median(sub))
