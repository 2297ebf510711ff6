"""The paper's seven VQA benchmarks, loaded into ``SampleSet``s the way lmms-eval reads them.

``load_benchmark(name, source=None, split=None, n=None)``. ``source`` is

- ``None``: the lmms-eval Hugging Face dataset (``HUB_IDS``), read with the optional ``datasets`` package
  (streamed when ``n`` is given, so a few samples do not download a whole split);
- another Hugging Face dataset id (``owner/name``) with the same layout (a mirror);
- a local path: a ``.parquet``, ``.jsonl``, ``.json`` (a list of rows) or ``.tsv`` (VLMEvalKit MMBench) file, or a
  folder holding such files (searched three levels deep; HF exports ``<split>-00000-of-00001.parquet`` and
  ``<split>.jsonl`` files are picked by ``split``) plus, optionally, an image folder. An image field may be a
  PIL image, raw bytes, an HF export dict ``{"bytes": ..., "path": ...}``, a path relative to the data file, the
  folder or its ``images/`` subfolder, or a base64 string (VLMEvalKit TSV). A row with no image field but an
  ``imageId``/``image_id`` gets its image from an image table in the folder (rows ``{"id", "image"}``, like GQA's
  ``*_images`` config) or from a file ``<imageId>.jpg|.jpeg|.png`` in the folder or its ``images/`` subfolder.

Schemas (lmms-eval datasets; default config / split; splits without public answers):

=========  ==========================  =====================================================================
benchmark  hub id / config / split     columns used (others go to ``Sample.meta``)
=========  ==========================  =====================================================================
gqa        lmms-lab/GQA                ``testdev_balanced_instructions``: id, imageId, question, answer,
           {split}_balanced_instr.     fullAnswer, isBalanced, types{structural, semantic, detailed}, ...
           / testdev                   joined on imageId with ``testdev_balanced_images``: id, image.
                                       family = types.structural. No answers: the ``test_*`` configs.
vqav2      lmms-lab/VQAv2 / validation question_id, question, answers = [{answer, answer_confidence, answer_id}] x10,
                                       multiple_choice_answer, question_type, answer_type, image_id, image.
                                       family = answer_type. No answers: testdev, test.
okvqa      lmms-lab/OK-VQA / val2014   question_id (str), question, answers = [str] x10, question_type,
                                       answer_type, image. family = question_type. Only val2014 exists.
vizwiz     lmms-lab/VizWiz-VQA / val   question_id (str), question, answers = [str] x10, category, image.
                                       family = category. No answers: test.
textvqa    lmms-lab/textvqa /          question_id, question, answers = [str] x10, image_id, image, ocr_tokens,
           validation                  image_classes, ... No answers: test (empty strings).
docvqa     lmms-lab/DocVQA, config     questionId (str), question, question_types, answers = [str], docId,
           DocVQA / validation         ucsf_document_id, ucsf_document_page_no, image. family = first
                                       question type. No answers: test.
mmbench    lmms-lab/MMBench, config    index, question, hint, A, B, C, D (absent options None/"nan"), answer
           en / dev                    (letter), category, L2-category, source, split, image.
                                       family = category. No answers: test.
=========  ==========================  =====================================================================

Scorers: gqa -> "exact", vqav2/okvqa/vizwiz/textvqa -> "vqa", docvqa -> "anls", mmbench -> "option".

Groups (`Sample.group`, what a dev/test split keeps on one side): the image id where several questions share an
image (``GROUP_COLUMNS``: GQA imageId, VQAv2/TextVQA image_id, DocVQA docId), MMBench's question (``index`` modulo
10^6, shared by its rotated copies), none for OK-VQA and VizWiz. On MMBench ``n`` counts questions, each loaded with
all its rotated copies (`whole_questions`), so a small ``n`` never cuts a question's copies apart.

Prompts follow lmms-eval's ``doc_to_text``: the question as is, except VizWiz and TextVQA, whose question goes
through ``str.capitalize()`` (which also lower-cases the rest; the raw text is in ``meta["raw_question"]``), and
MMBench, built as ``"{hint} {question} There are several options:\\nA. ...\\nB. ..."`` (hint dropped when missing or
"nan") with the option texts in ``Sample.choices`` and ``answers == [letter]``. ``POST_PROMPTS`` holds each
benchmark's default post-prompt (joined to the question with a newline by ``fusion_utils.prompts.user_text``).
lmms-eval's OK-VQA and VizWiz templates prepend an 'Unanswerable' instruction; its newest ``vqav2_val`` task sets
an empty post-prompt, while its VQAv2 template (and LLaVA's evaluation) use the default one kept here.
"""
from __future__ import annotations

import base64
import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..prompts import POST_PROMPT

from PIL import Image

from .sample import Sample, SampleSet

_UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'.\n" + POST_PROMPT

POST_PROMPTS: dict[str, str] = {
    "gqa": POST_PROMPT,
    "vqav2": POST_PROMPT,
    "okvqa": _UNANSWERABLE,
    "vizwiz": _UNANSWERABLE,
    "textvqa": POST_PROMPT,
    "docvqa": POST_PROMPT,
    "mmbench": "Answer with the option's letter from the given choices directly.",
}

MMBENCH_OPTIONS_HEADER = "There are several options:"  # lmms-eval mmbench.yaml metadata.sys_prompt


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    hub_id: str
    hub_config: str | None
    default_split: str
    scorer: str
    id_column: str
    required: tuple[str, ...]
    no_answer_splits: tuple[str, ...]
    images_config: str | None = None  # GQA keeps images in a second config joined on imageId


SPECS: dict[str, BenchmarkSpec] = {
    "gqa": BenchmarkSpec("gqa", "lmms-lab/GQA", "{split}_balanced_instructions", "testdev", "exact", "id",
                         ("id", "question", "answer"), ("test", "challenge", "submission"),
                         images_config="{split}_balanced_images"),
    "vqav2": BenchmarkSpec("vqav2", "lmms-lab/VQAv2", None, "validation", "vqa", "question_id",
                           ("question_id", "question", "answers"), ("testdev", "test")),
    "okvqa": BenchmarkSpec("okvqa", "lmms-lab/OK-VQA", None, "val2014", "vqa", "question_id",
                           ("question_id", "question", "answers"), ()),
    "vizwiz": BenchmarkSpec("vizwiz", "lmms-lab/VizWiz-VQA", None, "val", "vqa", "question_id",
                            ("question_id", "question", "answers"), ("test",)),
    "textvqa": BenchmarkSpec("textvqa", "lmms-lab/textvqa", None, "validation", "vqa", "question_id",
                             ("question_id", "question", "answers"), ("test",)),
    "docvqa": BenchmarkSpec("docvqa", "lmms-lab/DocVQA", "DocVQA", "validation", "anls", "questionId",
                            ("questionId", "question", "answers"), ("test",)),
    "mmbench": BenchmarkSpec("mmbench", "lmms-lab/MMBench", "en", "dev", "option", "index",
                             ("index", "question", "A", "B", "answer"), ("test",)),
}
HUB_IDS = {k: s.hub_id for k, s in SPECS.items()}
SCORER_OF = {k: s.scorer for k, s in SPECS.items()}

_DATA_EXTS = (".parquet", ".jsonl", ".json", ".tsv")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def load_benchmark(name: str, source: str | Path | None = None, split: str | None = None,
                   n: int | None = None) -> SampleSet:
    """Load benchmark ``name`` (gqa, vqav2, okvqa, vizwiz, textvqa, docvqa, mmbench) as a ``SampleSet``.

    ``source``: None (the lmms-eval hub dataset), a hub id, or a local file/folder (see the module docstring).
    ``split``: defaults to the lmms-eval evaluation split. ``n``: keep the first ``n`` samples; on MMBench, the first
    ``n`` *questions* with every rotated copy of each (`whole_questions`), so the set holds more than ``n`` rows and
    CircularEval sees whole questions (``meta["n_questions"]`` says how many).
    """
    key = str(name).lower()
    if key not in SPECS:
        raise ValueError(f"Unknown benchmark {name!r}; use one of {', '.join(SPECS)}.")
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative integer or None, got {n!r}.")
    spec = SPECS[key]
    src = spec.hub_id if source is None else source
    if _is_local(src):
        path = Path(src).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"No file or folder at {str(path)!r}; pass an existing JSONL/Parquet file or folder, "
                f"or a Hugging Face dataset id such as {spec.hub_id!r}.")
        rows, used_split, ctx = _local_rows(spec, path, split)
        origin = str(path)
    else:
        used_split = split or spec.default_split
        rows, ctx = _hub_rows(spec, str(src), used_split, n)
        origin = f"hf://{src}"
    if key == "mmbench" and n is not None:
        rows = whole_questions(rows, n)
    samples: list[Sample] = []
    if n != 0:
        for row in rows:
            samples.append(_to_sample(spec, row, used_split, ctx))
            if key != "mmbench" and n is not None and len(samples) >= n:
                break
    has_answers = any(s.answers for s in samples)
    if samples and not has_answers:
        warnings.warn(f"{key} split {used_split!r} from {origin} has no gold answers (public answers exist only "
                      f"for the evaluation split {spec.default_split!r}); every score will be 0.", stacklevel=2)
    meta = {"source": origin, "split": used_split, "post_prompt": POST_PROMPTS[key], "has_answers": has_answers}
    if key == "mmbench":
        meta["n_questions"] = len({s.group for s in samples})
    return SampleSet(key, samples, spec.scorer, meta)


# ----------------------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------------------

def _is_local(src: Any) -> bool:
    if isinstance(src, Path):
        return True
    s = str(src)
    if Path(s).expanduser().exists():
        return True
    if s.startswith((".", "/", "~")) or "\\" in s or s.lower().endswith(_DATA_EXTS):
        return True
    # a hub id is exactly "owner/name"
    return not re.fullmatch(r"[\w.\-]+/[\w.\-]+", s)


@dataclass
class _Ctx:
    """Where images come from for rows that do not embed them."""
    base_dirs: tuple[Path, ...] = ()
    image_lookup: Callable[[str], Any] | None = None


def _hub_rows(spec: BenchmarkSpec, hub_id: str, split: str, n: int | None):
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise ImportError(f"Loading {spec.name} from the Hugging Face Hub ({hub_id}) needs the datasets package: "
                          f"pip install datasets (or pass source= a local JSONL/Parquet file or folder).") from None
    import datasets

    streaming = n is not None
    ds = hub_load(datasets, spec, hub_id, _config(spec.hub_config, split), split, streaming)
    # MMBench's rotated copies sit far from their question in the file: `whole_questions` reads on until they are in
    rows: Iterable[dict] = ds if n is None or spec.name == "mmbench" else _take(ds, n)
    ctx = _Ctx()
    if spec.images_config:  # GQA: questions and images live in two configs joined on imageId
        rows = list(rows)
    if spec.images_config and rows and _missing_image(rows[0].get("image")):
        needed = {_str(r.get("imageId")) for r in rows}
        images = hub_load(datasets, spec, hub_id, _config(spec.images_config, split), split, streaming)
        found: dict[str, Any] = {}
        for r in images:
            rid = _str(r["id"])
            if rid in needed:
                found[rid] = r["image"]
                if len(found) == len(needed):
                    break
        ctx.image_lookup = found.get
    return rows, ctx


def hub_load(datasets, spec: BenchmarkSpec, hub_id: str, config: str | None, split: str, streaming: bool):
    """`datasets.load_dataset`, with a failure (no network, no cached copy, a gated set) said in one sentence."""
    try:
        return datasets.load_dataset(hub_id, config, split=split, streaming=streaming)
    except Exception as err:  # noqa: BLE001 - connection, cache and auth errors all end the same way
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise OSError(f"Could not load {spec.name} from the Hugging Face Hub ({hub_id}, {type(err).__name__}: "
                      f"{first}); without a network, point source= (--source) at a local JSONL/Parquet file or "
                      f"folder of the benchmark, or set HF_HOME to a cache that holds it and HF_DATASETS_OFFLINE=1."
                      ) from None


def _config(config: str | None, split: str) -> str | None:
    """GQA's configs are per split: ``{split}_balanced_instructions`` / ``{split}_balanced_images``."""
    return config.format(split=split) if config else config


def mmbench_group(row: dict) -> str:
    """An MMBench row's question key: its ``index`` modulo 10^6 (VLMEvalKit's CircularEval numbers the k-th rotated
    copy of question q as q + k·10^6), as a string; the row's ``index`` itself when it is not an integer."""
    try:
        return str(int(float(row["index"])) % 1_000_000)
    except (TypeError, ValueError, KeyError):
        return _str(row.get("index"))


def _n_options(row: dict) -> int:
    return sum(not _absent(row.get(ch)) for ch in "ABCDE")


def whole_questions(rows: Iterable[dict], n: int) -> Iterator[dict]:
    """The rows of the first ``n`` MMBench questions (in order of first appearance) with all their rotated copies,
    wherever in the file the copies are: rows of other questions are skipped without being decoded. Reading stops
    once every kept question has as many copies as options (a question with m options has at most m rotations),
    else at the end of the file."""
    kept: dict[str, int] = {}  # question -> copies still missing
    for row in rows:
        g = mmbench_group(row)
        if g not in kept:
            if len(kept) >= n:
                continue
            kept[g] = max(1, _n_options(row))
        kept[g] -= 1
        yield row
        if len(kept) >= n and all(v <= 0 for v in kept.values()):
            return


def _take(it: Iterable, n: int) -> Iterator:
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


def _split_tag(p: Path) -> str:
    m = re.match(r"^(.+?)-\d{5}-of-\d{5}", p.name)
    if m:
        return m.group(1)
    return p.name.split(".")[0]


def _data_files(root: Path) -> list[Path]:
    out = []
    for depth in range(4):
        pattern = "/".join(["*"] * (depth + 1))
        for p in sorted(root.glob(pattern)):
            if p.is_file() and p.name.lower().endswith(_DATA_EXTS) and not p.name.startswith("."):
                out.append(p)
    return out


def _columns(path: Path) -> list[str]:
    suf = path.suffix.lower()
    if suf == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    first = next(iter(_read_rows(path)), None)
    return list(first) if first else []


def _is_image_table(path: Path) -> bool:
    cols = set(_columns(path))
    return "image" in cols and "id" in cols and cols <= {"id", "image"}


def _local_rows(spec: BenchmarkSpec, path: Path, split: str | None):
    if path.is_file():
        if not path.name.lower().endswith(_DATA_EXTS):
            raise ValueError(f"{path} is not a data file; pass a .parquet, .jsonl, .json or .tsv file, "
                             f"or a folder holding one.")
        base = path.parent
        ctx = _Ctx(base_dirs=(base, base / "images"))
        siblings = [p for p in sorted(base.iterdir()) if p.is_file() and p != path and p.name.lower().endswith(_DATA_EXTS)]
        _attach_image_tables(ctx, [p for p in siblings if _is_image_table(p)])
        return _read_rows(path), split or _split_tag(path), ctx
    files = _data_files(path)
    if not files:
        raise FileNotFoundError(f"No .parquet/.jsonl/.json/.tsv file under {path}; put the {spec.name} data file "
                                f"there or pass its path.")
    image_tables = [p for p in files if _is_image_table(p)]
    qfiles = [p for p in files if p not in image_tables]
    if not qfiles:
        raise ValueError(f"Under {path} there are only image tables (id, image); add the {spec.name} "
                         f"question file next to them.")
    tags = sorted({_split_tag(p) for p in qfiles})
    want = split or (spec.default_split if spec.default_split in tags else None)
    if want is not None:
        chosen = [p for p in qfiles if _split_tag(p) == want or p.parent.name == want]
        if not chosen:
            if split is not None and len(qfiles) > 1:
                raise ValueError(f"No {spec.name} file for split {split!r} under {path}; available: "
                                 f"{', '.join(tags)}. Pass one of those as split=.")
            chosen = qfiles
    elif len(tags) == 1:
        chosen = qfiles
    else:
        raise ValueError(f"Several splits under {path} ({', '.join(tags)}); pass split= one of them.")
    used = want or _split_tag(chosen[0])
    if image_tables and want is not None:
        same = [p for p in image_tables if _split_tag(p) == want or p.parent.name == want]
        image_tables = same or image_tables
    ctx = _Ctx(base_dirs=tuple(dict.fromkeys([chosen[0].parent, chosen[0].parent / "images", path,
                                              path / "images"])))
    _attach_image_tables(ctx, image_tables)

    def gen():
        for f in chosen:
            yield from _read_rows(f)

    return gen(), used, ctx


def _attach_image_tables(ctx: _Ctx, tables: list[Path]) -> None:
    if not tables:
        return
    cache: dict[str, Any] = {}
    state = {"loaded": False}

    def lookup(image_id: str):
        if not state["loaded"]:
            for t in tables:
                for r in _read_rows(t):
                    cache[str(r["id"])] = r["image"]
            state["loaded"] = True
        return cache.get(image_id)

    ctx.image_lookup = lookup


def _read_rows(path: Path) -> Iterator[dict]:
    suf = path.suffix.lower()
    if suf == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=64):
            yield from batch.to_pylist()
    elif suf == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {i} is not valid JSON ({e.msg}); fix or remove that line.") from None
    elif suf == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of rows (or an object with one such list).")
        yield from data
    elif suf == ".tsv":
        import pandas as pd

        df = pd.read_csv(path, sep="\t")
        for r in df.to_dict(orient="records"):
            yield {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
    else:  # pragma: no cover - filtered before
        raise ValueError(f"Unsupported data file {path}; use .parquet, .jsonl, .json or .tsv.")


# ----------------------------------------------------------------------------------------------------------------
# rows -> samples
# ----------------------------------------------------------------------------------------------------------------

def _missing(x: Any) -> bool:
    if x is None:
        return True
    if isinstance(x, float) and math.isnan(x):
        return True
    return isinstance(x, str) and x.strip().lower() in ("", "nan", "none")


def _absent(x: Any) -> bool:
    """lmms-eval's test for a missing MMBench option or hint: None, NaN, "nan" or empty (an option "None" stays)."""
    return x is None or (isinstance(x, float) and math.isnan(x)) or (isinstance(x, str) and x.strip() in ("", "nan"))


def _str(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _answers(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    out = []
    for a in list(value):
        if isinstance(a, dict):
            a = a.get("answer")
        if a is None:
            continue
        out.append(str(a))
    if out and all(not a.strip() for a in out):  # TextVQA test: 10 empty strings
        return []
    return out


def _open_image(value: Any, ctx: _Ctx, sid: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return _from_bytes(value["bytes"], sid)
        if value.get("path"):
            return _open_image(value["path"], ctx, sid)
        raise ValueError(f"Sample {sid}: image dict has neither bytes nor path.")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(value), sid)
    if isinstance(value, str):
        p = Path(value).expanduser()
        candidates = [p] if p.is_absolute() else [d / value for d in ctx.base_dirs]
        for c in candidates:
            if c.is_file():
                return _from_bytes(c.read_bytes(), sid)
        if not Path(value).suffix.lower() in _IMAGE_EXTS:  # VLMEvalKit TSVs embed base64 images
            try:
                return _from_bytes(base64.b64decode(value, validate=True), sid)
            except Exception:
                pass
        raise FileNotFoundError(f"Sample {sid}: image {value!r} not found (looked in "
                                f"{', '.join(str(d) for d in ctx.base_dirs) or 'nowhere'}); put the image folder "
                                f"next to the data file or use absolute paths.")
    raise ValueError(f"Sample {sid}: unsupported image value of type {type(value).__name__}.")


def _from_bytes(b: bytes, sid: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(b))
    except Exception as e:
        raise ValueError(f"Sample {sid}: the image bytes are not a readable image ({e}).") from None


def _image_for(row: dict, ctx: _Ctx, sid: str) -> Image.Image:
    if not _missing_image(row.get("image")):
        return _open_image(row["image"], ctx, sid)
    for key in ("image_path", "imageId", "image_id", "img_id"):
        v = row.get(key)
        if v is None:
            continue
        v = _str(v)
        if ctx.image_lookup is not None:
            hit = ctx.image_lookup(v)
            if hit is not None:
                return _open_image(hit, ctx, sid)
        if key == "image_path":
            return _open_image(v, ctx, sid)
        for d in ctx.base_dirs:
            for ext in _IMAGE_EXTS:
                c = d / f"{v}{ext}"
                if c.is_file():
                    return _from_bytes(c.read_bytes(), sid)
    raise ValueError(f"Sample {sid} has no image: give rows an 'image' field (path, bytes or HF image dict) or an "
                     f"imageId with an image table / image folder next to the data file.")


def _missing_image(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _check_columns(spec: BenchmarkSpec, row: dict, split: str) -> None:
    required = list(spec.required)
    low = split.lower()
    if low in spec.no_answer_splits or any(low.startswith(s) for s in spec.no_answer_splits) or "test" in low:
        required = [c for c in required if c not in ("answers", "answer")]
    missing = [c for c in required if c not in row]
    if missing:
        raise ValueError(f"{spec.name}: rows lack column(s) {', '.join(missing)} (found: "
                         f"{', '.join(sorted(map(str, row))) or 'none'}); convert the file to the {spec.hub_id} "
                         f"layout documented in fusion_utils.data.benchmarks, or load it as the benchmark it is.")


def mmbench_question(row: dict) -> tuple[str, list[str], list[str]]:
    """lmms-eval's MMBench prompt: ``(question text, option texts, option letters)``."""
    letters, texts = [], []
    for ch in "ABCDE":
        v = row.get(ch)
        if not _absent(v):
            letters.append(ch)
            texts.append(str(v))
    options = MMBENCH_OPTIONS_HEADER + "\n" + "\n".join(f"{c}. {t}" for c, t in zip(letters, texts))
    question = str(row["question"])
    hint = row.get("hint")
    text = f"{hint} {question} {options}" if not _absent(hint) else f"{question} {options}"
    return text, texts, letters


_SKIP_META = {"image", "question", "answers", "answer"}


def _meta_of(row: dict, keys: Iterable[str]) -> dict:
    out = {}
    for k in keys:
        if k in row and k not in _SKIP_META:
            v = row[k]
            if isinstance(v, float) and math.isnan(v):
                v = None
            out[k] = v
    return out


def _to_sample(spec: BenchmarkSpec, row: dict, split: str, ctx: _Ctx) -> Sample:
    _check_columns(spec, row, split)
    sid = _str(row[spec.id_column])
    name = spec.name
    meta: dict[str, Any] = {"benchmark": name, "split": split}
    question = str(row["question"])
    choices = None
    family = None
    if name == "gqa":
        answers = [] if _missing(row.get("answer")) else [str(row["answer"])]
        types = row.get("types") if isinstance(row.get("types"), dict) else {}
        family = types.get("structural") or types.get("semantic")
        meta.update(_meta_of(row, ("imageId", "fullAnswer", "isBalanced", "types")))
    elif name == "vqav2":
        answers = _answers(row.get("answers"))
        family = row.get("answer_type")
        meta.update(_meta_of(row, ("image_id", "question_type", "answer_type", "multiple_choice_answer")))
    elif name == "okvqa":
        answers = _answers(row.get("answers"))
        family = row.get("question_type")
        meta.update(_meta_of(row, ("question_type", "answer_type")))
    elif name == "vizwiz":
        answers = _answers(row.get("answers"))
        family = row.get("category")
        meta["raw_question"] = question
        question = question.capitalize()
        meta.update(_meta_of(row, ("category",)))
    elif name == "textvqa":
        answers = _answers(row.get("answers"))
        meta["raw_question"] = question
        question = question.capitalize()
        meta.update(_meta_of(row, ("image_id", "ocr_tokens", "image_classes", "set_name")))
    elif name == "docvqa":
        answers = _answers(row.get("answers"))
        qt = row.get("question_types")
        if isinstance(qt, (list, tuple)) and qt:
            family = str(qt[0])
        meta.update(_meta_of(row, ("question_types", "docId", "ucsf_document_id", "ucsf_document_page_no",
                                   "data_split")))
    elif name == "mmbench":
        question, choices, letters = mmbench_question(row)
        ans = row.get("answer")
        answers = [] if _missing(ans) else [str(ans).strip().upper()]
        if answers and answers[0] not in letters:
            raise ValueError(f"mmbench sample {sid}: answer {ans!r} is not one of the options {letters}.")
        family = row.get("category")
        meta["raw_question"] = str(row["question"])
        meta["hint"] = None if _absent(row.get("hint")) else row.get("hint")
        meta["letters"] = letters
        try:
            meta["circular_group"] = int(float(row["index"])) % 1_000_000
        except (TypeError, ValueError):
            pass  # not an integer index: no CircularEval group in meta (Sample.group still keys the row)
        meta.update(_meta_of(row, ("category", "L2-category", "l2-category", "source", "comment")))
    else:  # pragma: no cover
        raise ValueError(f"Unknown benchmark {name!r}.")
    image = _image_for(row, ctx, sid)
    return Sample(id=sid, image=image, question=question, answers=answers, family=None if family is None
                  else str(family), choices=choices, meta=meta, group=_group_of(name, row))


#: the column that names a row's image (several questions share it) per benchmark; OK-VQA and VizWiz give none
GROUP_COLUMNS = {"gqa": "imageId", "vqav2": "image_id", "textvqa": "image_id", "docvqa": "docId"}


def _group_of(name: str, row: dict) -> str | None:
    """`Sample.group`: MMBench's question (its rotated copies share it), else the image id where the rows have one."""
    if name == "mmbench":
        return mmbench_group(row)
    col = GROUP_COLUMNS.get(name)
    v = row.get(col) if col else None
    return None if _missing(v) else f"{col}:{_str(v)}"


__all__ = ["load_benchmark", "POST_PROMPTS", "POST_PROMPT", "HUB_IDS", "SPECS", "SCORER_OF",
           "BenchmarkSpec", "mmbench_question", "mmbench_group", "whole_questions", "GROUP_COLUMNS"]
