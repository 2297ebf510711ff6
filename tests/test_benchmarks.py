"""Benchmark loaders against tiny fixtures in each benchmark's real (lmms-eval Hugging Face) schema."""
import sys
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from fusion_utils.data import load_dataset
from fusion_utils.data.benchmarks import HUB_IDS, POST_PROMPTS, load_benchmark
from fusion_utils.metrics import score

FIX = Path(__file__).parent / "fixtures" / "benchmarks"

EXPECTED = {
    # name: (scorer, n, first id, first question, first answers[:2], first family)
    "gqa": ("exact", 4, "201307251", "Is it overcast?", ["no"], "verify"),
    "vqav2": ("vqa", 4, "262148000", "What color is the square?", ["red", "red"], "other"),
    "okvqa": ("vqa", 3, "2971475", "What sport can you use this for?", ["race", "race"], "one"),
    "vizwiz": ("vqa", 3, "VizWiz_val_00000000.jpg", "What is this?", ["soda", "soda"], "other"),
    "textvqa": ("vqa", 3, "34602", "What is the brand of this camera?", ["nous les gosses", "dakota"], None),
    "docvqa": ("anls", 3, "49153", "What is the ‘actual’ value per 1000, during the year 1975?", ["0.28"],
               "figure/diagram"),
    "mmbench": ("option", 4, "0", "Which category does this image belong to? There are several options:\n"
                "A. Oil Paiting\nB. Sketch\nC. Digital art\nD. Photo", ["A"], "image_style"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_load_fixture(name):
    scorer, n, sid, question, answers, family = EXPECTED[name]
    for ds in (load_benchmark(name, source=FIX / name), load_dataset(name, source=str(FIX / name))):
        assert ds.name == name and ds.scorer == scorer and len(ds) == n
        s = ds[0]
        assert s.id == sid and s.question == question and s.answers[:2] == answers and s.family == family
        assert isinstance(s.image, Image.Image) and s.image.convert("RGB").size == (16, 16)
        assert all(isinstance(x.id, str) for x in ds) and len(set(ds.ids)) == n
        assert s.meta["benchmark"] == name
        assert ds.meta["post_prompt"] == POST_PROMPTS[name] and ds.meta["has_answers"]
        # the gold answers score perfectly with the benchmark's scorer
        pred = "A" if name == "mmbench" else max(s.answers, key=s.answers.count)
        assert score(ds.scorer, pred, s) == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_n_limits(name):
    ds = load_benchmark(name, source=FIX / name, n=2)
    if name == "mmbench":  # n counts questions, each with its rotated copies (question 1's copy is the last row)
        assert ds.ids == ["0", "1", "1000001"] and ds.meta["n_questions"] == 2
    else:
        assert len(ds) == 2 and ds.ids == load_benchmark(name, source=FIX / name).ids[:2]
    assert len(load_dataset(name, source=str(FIX / name), n=1)) == 1
    assert len(load_benchmark(name, source=FIX / name, n=0)) == 0


def test_vqav2_answer_dicts_and_ten_answers():
    ds = load_benchmark("vqav2", source=FIX / "vqav2")
    assert all(len(s.answers) == 10 for s in ds)
    assert ds[1].answers.count("2") == 7 and ds[1].family == "number"
    assert ds[1].meta["multiple_choice_answer"] == "2"
    assert score("vqa", "two", ds[1]) == pytest.approx(1.0)      # 7 + "two" -> normalised 8 matches
    assert score("vqa", "3", ds[1]) == pytest.approx(0.3)        # one match


def test_gqa_images_joined_by_image_id():
    ds = load_benchmark("gqa", source=FIX / "gqa")
    assert [s.meta["imageId"] for s in ds] == ["n161313", "n161313", "n235859", "n336443"]
    # questions on the same image get the same pixels
    assert ds[0].image.tobytes() == ds[1].image.tobytes() != ds[2].image.tobytes()
    assert score("exact", "No.", ds[0]) == 1.0 and score("exact", "yes", ds[0]) == 0.0


def test_gqa_single_file_with_sibling_image_folder(tmp_path):
    rows = pq.read_table(FIX / "gqa" / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet")
    pq.write_table(rows, tmp_path / "questions.parquet")
    (tmp_path / "images").mkdir()
    for k, im in enumerate(["n161313", "n235859", "n336443"]):
        Image.new("RGB", (8, 8), (k * 50, 0, 0)).save(tmp_path / "images" / f"{im}.jpg")
    ds = load_benchmark("gqa", source=tmp_path / "questions.parquet")
    assert len(ds) == 4 and ds[2].image.size == (8, 8)


def test_textvqa_and_vizwiz_questions_capitalised_like_lmms_eval():
    t = load_benchmark("textvqa", source=FIX / "textvqa")
    assert t[0].question == "What is the brand of this camera?"
    assert t[0].meta["raw_question"] == "what is the brand of this camera?"
    v = load_benchmark("vizwiz", source=FIX / "vizwiz")
    assert v[0].question == "What is this?" and v[1].question == "Is the light on?"
    assert "Unanswerable" in POST_PROMPTS["vizwiz"] and POST_PROMPTS["textvqa"] == POST_PROMPTS["gqa"]


def test_okvqa_jsonl_relative_images():
    ds = load_benchmark("okvqa", source=FIX / "okvqa" / "val2014.jsonl")
    assert len(ds) == 3 and ds.meta["split"] == "val2014"
    assert score("vqa", "Italy", ds[2]) == pytest.approx(1.0)
    assert score("vqa", "usa", ds[2]) == pytest.approx(0.6)


def test_docvqa_anls():
    ds = load_benchmark("docvqa", source=FIX / "docvqa")
    assert ds[1].answers == ["University of California", "university of california"]
    assert score("anls", "University of Californa", ds[1]) == pytest.approx(1 - 1 / 24)
    assert ds[2].meta["question_types"] == ["form", "layout"] and ds[2].family == "form"


def test_mmbench_prompt_choices_and_letters():
    ds = load_benchmark("mmbench", source=FIX / "mmbench")
    s = ds[1]  # hint present, only options A and B
    assert s.question == ("The image shows a single shape. What is the main color of the image? "
                          "There are several options:\nA. blue\nB. green")
    assert s.choices == ["blue", "green"] and s.answers == ["B"] and s.meta["letters"] == ["A", "B"]
    assert ds[2].question.startswith("Which option describes the object? There are")  # hint "nan" dropped
    assert ds[3].meta["circular_group"] == 1 and ds[3].answers == ["A"]  # circular copy of question 1
    from fusion_utils.metrics import circular_accuracy

    right = [score("option", s.answers[0], s) for s in ds]
    assert circular_accuracy(ds.ids, right) == 1.0
    groups = {s.meta["circular_group"] for s in ds}
    wrong_copy = [0.0 if s is ds[3] else r for s, r in zip(ds, right)]  # question 1 fails on its rotated copy
    assert circular_accuracy(ds.ids, wrong_copy) == pytest.approx((len(groups) - 1) / len(groups))
    assert score("option", "green", s) == 1.0 and score("option", "(A) blue", s) == 0.0
    assert POST_PROMPTS["mmbench"] == "Answer with the option's letter from the given choices directly."


def test_mmbench_vlmevalkit_tsv_base64():
    ds = load_benchmark("mmbench", source=FIX / "mmbench_tsv" / "MMBench_DEV_EN.tsv")
    assert len(ds) == 2 and ds[1].choices == ["blue", "green"] and ds[1].image.size == (16, 16)
    assert ds[0].question == EXPECTED["mmbench"][3]


def test_split_selection_and_no_answer_split():
    assert load_benchmark("vizwiz", source=FIX / "vizwiz").meta["split"] == "val"  # default split preferred
    with pytest.warns(UserWarning, match="no gold answers"):
        test = load_benchmark("vizwiz", source=FIX / "vizwiz", split="test")
    assert len(test) == 1 and test[0].answers == [] and not test.meta["has_answers"]
    with pytest.raises(ValueError, match="split"):
        load_benchmark("vizwiz", source=FIX / "vizwiz", split="train")


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="Unknown benchmark"):
        load_benchmark("coco", source=FIX / "gqa")
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_dataset("coco")
    with pytest.raises(FileNotFoundError, match="JSONL/Parquet"):
        load_benchmark("gqa", source=tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="No .parquet"):
        load_benchmark("gqa", source=tmp_path)
    with pytest.raises(ValueError, match="questionId"):  # a GQA file loaded as DocVQA
        load_benchmark("docvqa", source=FIX / "gqa")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "question": "q?", "answers": ["a"], "image": "nope.png"}\n')
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_benchmark("okvqa", source=bad)
    bad.write_text('{"question_id": 1, "question": "q?", "answers": ["a"]}\n')
    with pytest.raises(ValueError, match="no image"):
        load_benchmark("okvqa", source=bad)
    img = FIX / "okvqa" / "images" / "COCO_val2014_2971475.png"
    bad.write_text(f'{{"question_id": 1, "question": "q?", "answers": ["a"], "image": "{img}"}}\n{{oops\n')
    assert len(load_benchmark("okvqa", source=bad, n=1)) == 1  # n stops before the broken line
    with pytest.raises(ValueError, match="line 2"):
        load_benchmark("okvqa", source=bad)


def test_hub_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        load_benchmark("vqav2")


def test_hub_path_with_fake_datasets(monkeypatch):
    """The hub branch: default ids/configs/splits and the GQA instructions+images join, without network."""
    calls = []
    inst = pq.read_table(FIX / "gqa" / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet").to_pylist()
    imgs = [{"id": r["id"], "image": Image.new("RGB", (4, 4))} for r in
            pq.read_table(FIX / "gqa" / "testdev_balanced_images" / "testdev-00000-of-00001.parquet").to_pylist()]
    mmb = pq.read_table(FIX / "mmbench" / "en" / "dev-00000-of-00001.parquet").to_pylist()

    def fake_load(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        if name == "testdev_balanced_instructions":
            return inst
        if name == "testdev_balanced_images":
            return iter(imgs)
        return mmb

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    g = load_benchmark("gqa", n=3)
    assert len(g) == 3 and g[0].image.size == (4, 4) and g.meta["source"] == "hf://lmms-lab/GQA"
    assert calls[:2] == [("lmms-lab/GQA", "testdev_balanced_instructions", "testdev", True),
                         ("lmms-lab/GQA", "testdev_balanced_images", "testdev", True)]
    m = load_benchmark("mmbench")
    assert len(m) == 4 and calls[-1] == ("lmms-lab/MMBench", "en", "dev", False)
    m2 = load_benchmark("mmbench", n=2)  # streamed past the first n rows, to question 1's rotated copy
    assert m2.ids == ["0", "1", "1000001"] and calls[-1] == ("lmms-lab/MMBench", "en", "dev", True)
    assert HUB_IDS["vqav2"] == "lmms-lab/VQAv2" and HUB_IDS["docvqa"] == "lmms-lab/DocVQA"


def test_fixtures_are_small():
    total = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file())
    assert total < 300_000
