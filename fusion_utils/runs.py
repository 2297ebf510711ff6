"""Run records: one directory per (experiment, configuration), appended to as samples finish, resumable after a kill.

Layout::

    root/experiment/<key>/            key = config_hash(config)[:12]
        config.json                   {"key", "hash", "experiment", "config", "provenance"} (atomic write)
        records.jsonl                 one JSON object per line, each with a string "id"
        records.rank<r>.jsonl         rank r's shard in a data-parallel run (r >= 1; rank 0 writes records.jsonl),
                                      appended to records.jsonl by ``merge_shards`` once every rank has finished
        progress.rank<r> / failed.rank<r>   while a data-parallel run is on: rank r's count of finished samples,
                                      and its error if it failed (``note_progress`` / ``note_failure``)
        sessions.jsonl                provenance of every open_run (creation and each resume)
        summary.json / summary.csv    written atomically (``write_summary``)

Usage::

    run = open_run("runs", "masking", {"model": "llava-1.5-7b", "dataset": ds.fingerprint(), "layers": [0, 4]})
    todo = [s for s in ds if s.id not in run.done_ids()]
    for s in todo:
        run.append([{"id": s.id, "layer": l, "acc": ...} for l in layers])   # all rows of a sample in one call
    df = run.records()
    run.write_summary(df.groupby("layer")["acc"].mean().reset_index())

Guarantees: the same configuration always maps to the same directory, and different ones never share a
directory (if ``config.json`` in the target holds another configuration, ``open_run`` raises). Each ``append``
writes its lines with a single ``write`` call followed by flush + fsync, so a killed process leaves at most a
truncated final line; ``records()`` ignores it and the next ``open_run`` cuts it off before appending. Summaries are
written to a temporary file in the same directory and moved into place with ``os.replace``, so readers never see
a partial file. One writer per file at a time (no locking): in a data-parallel run each rank appends to its own
shard (``open_run(..., shard=rank)``) and only rank 0, after a barrier, merges the shards into ``records.jsonl``.
Readers see every complete line of every file, and a sample's rows come from the first file holding its id
(``records.jsonl``, then the shards by rank), so a merge killed between its append and its unlinking of the shards
counts nothing twice.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["Run", "open_run", "config_hash", "canonical_json", "provenance", "sibling_key", "adopt"]


# ----------------------------------------------------------------------------------------------------------------
# canonical configuration
# ----------------------------------------------------------------------------------------------------------------

def _canon(x: Any) -> Any:
    """Plain-JSON form of a configuration value (used for hashing and for config.json)."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return repr(x)  # "nan", "inf": stable and valid JSON
        return x
    if isinstance(x, Mapping):
        return {str(k): _canon(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_canon(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted((_canon(v) for v in x), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(x, Path):
        return str(x)
    mod = type(x).__module__.split(".")[0]
    if mod == "numpy":
        return _canon(x.tolist()) if hasattr(x, "tolist") else str(x)
    if mod == "torch":
        if hasattr(x, "tolist") and callable(x.tolist):
            return _canon(x.tolist())
        return str(x)  # dtype, device
    if hasattr(x, "__dataclass_fields__"):
        import dataclasses

        return {"__type__": type(x).__name__, **_canon(dataclasses.asdict(x))}
    raise TypeError(f"Configuration value {x!r} of type {type(x).__name__} is not JSON-like; "
                    f"use str/int/float/bool/None, lists, tuples or dicts of them.")


def canonical_json(config: Mapping[str, Any]) -> str:
    """Canonical JSON text of a configuration: sorted keys, no whitespace, floats by repr, tuples as lists."""
    return json.dumps(_canon(config), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of ``canonical_json(config)``. Note 1 and 1.0 hash differently (they differ in JSON)."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def package_source_hash(max_layer: int | None = None) -> str:
    """Hash of the ``fusion_utils`` sources that decide a result: layers ``0..max_layer`` of
    `fusion_utils.layering` (default: the run layers, 0-3). Run directories are keyed on it, so an edit of the code
    that computes the numbers never reuses records other code made, while a restyled figure, verdict table or book
    driver (layers 4-5) keeps them."""
    from .layering import PACKAGE, RUN_LAYERS, sources

    h = hashlib.sha256()
    for f in sources(RUN_LAYERS if max_layer is None else max_layer):
        h.update(f.relative_to(PACKAGE).as_posix().encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# provenance
# ----------------------------------------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(dist)
        except PackageNotFoundError:
            return None
    except Exception:  # pragma: no cover
        return None


def _git(*args: str) -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """Where and with what a run was made: versions, platform, git commit (if any), UTC time, command line."""
    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    fu = _version("fusion_utils") or _version("fusion-utils")
    if fu is None:
        fu = getattr(sys.modules.get("fusion_utils"), "__version__", None)
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "fusion_utils": fu,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "git_commit": commit,
        "git_dirty": dirty,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
    }


# ----------------------------------------------------------------------------------------------------------------
# atomic files
# ----------------------------------------------------------------------------------------------------------------

def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the new file, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; a record or a built page must be readable as any file the user writes (umask)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _json_default(o: Any) -> Any:
    mod = type(o).__module__.split(".")[0]
    if mod in ("numpy", "torch") and hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (_dt.datetime, _dt.date)):
        return o.isoformat()
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serialisable; convert it before recording.")


# ----------------------------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------------------------

class Run:
    """A run directory (see the module docstring). Create it with ``open_run``."""

    def __init__(self, dir: Path, experiment: str, config: dict, key: str, hash: str, shard: int | None = None):
        self.dir = Path(dir)
        self.experiment = experiment
        self.config = config
        self.key = key
        self.hash = hash
        self.records_path = self.dir / "records.jsonl"
        # where `append` writes: records.jsonl, or this rank's shard in a data-parallel run
        self.write_path = self.records_path if not shard else self.dir / f"records.rank{int(shard)}.jsonl"
        self._done: set[str] | None = None

    def __repr__(self) -> str:
        return f"Run({self.experiment!r}, key={self.key!r}, dir={str(self.dir)!r})"

    # -- reading ---------------------------------------------------------------------------------------------------
    def shard_paths(self) -> list[Path]:
        """The rank shards present in the directory, by rank."""
        def rank_of(p: Path) -> int:
            try:
                return int(p.name[len("records.rank"):-len(".jsonl")])
            except ValueError:
                return -1
        return sorted((p for p in self.dir.glob("records.rank*.jsonl") if rank_of(p) >= 0), key=rank_of)

    def _iter_file(self, path: Path) -> Iterable[tuple[dict, bytes]]:
        """(record, its line) for every complete record of one file."""
        if not path.exists():
            return
        with open(path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # tail is b"" when the file ends with a newline
        for i, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line), line
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {i} is corrupt (not a truncated last line); repair or "
                                 f"delete that line to continue this run.") from None
        if tail.strip():
            try:  # a complete record that only lacks its newline still counts
                yield json.loads(tail), tail
            except json.JSONDecodeError:
                pass  # truncated by a kill: ignored

    def _iter_lines(self) -> Iterable[tuple[dict, bytes]]:
        shards = self.shard_paths()
        if not shards:  # one writer: records.jsonl as it is
            yield from self._iter_file(self.records_path)
            return
        seen: set[str] = set()  # ids of earlier files: a sample's rows come from the first file that holds it
        for path in [self.records_path, *shards]:
            here: set[str] = set()
            for r, line in self._iter_file(path):
                rid = str(r.get("id"))
                if rid in seen:
                    continue
                here.add(rid)
                yield r, line
            seen |= here

    def _iter_records(self) -> Iterable[dict]:
        for r, _ in self._iter_lines():
            yield r

    # -- notes between the ranks of a data-parallel run (progress for rank 0's bar, failures to stop early) --------
    def note_progress(self, rank: int, done: int) -> None:
        """Record that ``rank`` has finished ``done`` samples of this session (read by rank 0 for its bar)."""
        path = self.dir / f"progress.rank{int(rank)}"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(str(int(done)))
        os.replace(tmp, path)  # a reader sees the old or the new count, never half of one

    def progress(self) -> dict[int, int]:
        """Each rank's last noted count of finished samples."""
        out = {}
        for p in self.dir.glob("progress.rank*"):
            try:
                out[int(p.name[len("progress.rank"):])] = int(p.read_text() or 0)
            except (ValueError, OSError):
                continue  # replaced or removed meanwhile: the next read has it
        return out

    def note_failure(self, rank: int, message: str) -> None:
        """Record ``rank``'s error, so the other ranks stop after their current batch."""
        atomic_write_text(self.dir / f"failed.rank{int(rank)}", message)

    def failures(self) -> list[str]:
        """The errors noted by failed ranks of this session."""
        return [p.read_text(encoding="utf-8") for p in sorted(self.dir.glob("failed.rank*"))]

    def clear_notes(self) -> None:
        """Remove the progress and failure notes (before a session starts, and after it ends)."""
        for p in [*self.dir.glob("progress.rank*"), *self.dir.glob("failed.rank*")]:
            p.unlink(missing_ok=True)

    def merge_shards(self) -> int:
        """Append the rank shards' records to records.jsonl (one durable write) and delete the shards; returns the
        number of lines moved. Call it from one process only, when no rank is writing."""
        shards = self.shard_paths()
        if not shards:
            return 0
        have = {str(r["id"]) for r, _ in self._iter_file(self.records_path) if "id" in r}
        moved = [line for r, line in self._iter_lines() if str(r.get("id")) not in have]
        if moved:
            self._repair_tail(self.records_path)
            write_lines(self.records_path, b"\n".join(moved) + b"\n")
        for p in shards:
            p.unlink()
        _fsync_dir(self.dir)
        self._done = None
        return len(moved)

    def records(self):
        """All records as a pandas DataFrame (a truncated last line left by a kill is ignored)."""
        import pandas as pd

        rows = list(self._iter_records())
        if not rows:
            return pd.DataFrame(columns=["id"])
        return pd.DataFrame(rows)

    def resume(self) -> int:
        """Make the run ready to continue after a kill: a truncated last line is dropped and the finished samples are
        read again; returns how many there are.

        >>> import tempfile
        >>> run = open_run(tempfile.mkdtemp(), "masking", {"n": 2})
        >>> run.append({"id": "q1"}); run.resume()   # open_run already resumes; call it after another writer
        1
        """
        self._repair_tail()
        self.refresh()
        return len(self.done_ids())

    def refresh(self) -> None:
        """Forget which samples are done (read again on the next `done_ids`): another process appended records."""
        self._done = None

    def done_ids(self) -> set[str]:
        """The ids already recorded (as strings), to skip finished samples when resuming."""
        if self._done is None:
            self._done = {str(r["id"]) for r in self._iter_records() if "id" in r}
        return set(self._done)

    # -- writing ---------------------------------------------------------------------------------------------------
    def append(self, records: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Append one record or a list of records to records.jsonl, durably (one write call, flush, fsync).

        Every record needs an "id" (stored as a string). Values may be JSON types, numpy/torch scalars or arrays.
        """
        if isinstance(records, Mapping):
            records = [records]
        lines = []
        ids = []
        for r in records:
            if not isinstance(r, Mapping):
                raise TypeError(f"A record must be a dict, got {type(r).__name__}.")
            if "id" not in r or r["id"] is None:
                raise ValueError(f"Every record needs an 'id' (the sample id); got keys {sorted(r)}.")
            r = dict(r)
            r["id"] = str(r["id"])
            ids.append(r["id"])
            lines.append(json.dumps(r, default=_json_default, ensure_ascii=False))
        if not lines:
            return
        write_lines(self.write_path, ("\n".join(lines) + "\n").encode("utf-8"))
        if self._done is not None:
            self._done.update(ids)

    def write_summary(self, obj, name: str = "summary") -> Path:
        """Write ``obj`` atomically: a dict -> ``<name>.json``, a pandas DataFrame/Series -> ``<name>.csv``."""
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"Summary name {name!r} must be a plain file stem such as 'summary'.")
        if isinstance(obj, Mapping):
            path = self.dir / f"{name}.json"
            text = json.dumps(_canon_summary(obj), indent=2, sort_keys=True, default=_json_default,
                              ensure_ascii=False) + "\n"
        elif hasattr(obj, "to_csv"):
            path = self.dir / f"{name}.csv"
            text = obj.to_csv(index=not _default_index(obj))
        else:
            raise TypeError(f"write_summary takes a dict or a pandas DataFrame, got {type(obj).__name__}.")
        atomic_write_text(path, text)
        return path

    def _repair_tail(self, path: Path | None = None) -> None:
        """Cut off a truncated final line (left by a kill) so that new appends start on a fresh line."""
        p = self.write_path if path is None else path
        if not p.exists() or p.stat().st_size == 0:
            return
        with open(p, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            cut = data.rfind(b"\n") + 1  # 0 when there is no complete line
            tail = data[cut:]
            try:
                json.loads(tail)
                f.seek(0, os.SEEK_END)
                f.write(b"\n")  # complete record missing only its newline: keep it
            except json.JSONDecodeError:
                warnings.warn(f"{p}: dropping a truncated last record ({len(tail)} bytes) left by an interrupted "
                              f"run.", stacklevel=3)
                f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())


def write_lines(path: Path, payload: bytes) -> None:
    """Append ``payload`` to ``path`` with one write call, then fsync (a kill leaves at most a truncated last line)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_index(obj) -> bool:
    import pandas as pd

    idx = getattr(obj, "index", None)
    return isinstance(idx, pd.RangeIndex) and idx.start == 0 and idx.step == 1 and idx.name is None


def _canon_summary(obj: Mapping) -> Any:
    try:
        return _canon(obj)
    except TypeError:
        return obj  # let json's default= handle exotic leaves


def _check_name(experiment: str) -> None:
    if not experiment or not isinstance(experiment, str) or experiment in (".", "..") or any(
            c in experiment for c in "/\\\0"):
        raise ValueError(f"Experiment name {experiment!r} must be a non-empty plain folder name (no slashes).")


def open_run(root: str | os.PathLike, experiment: str, config: Mapping[str, Any], *, shard: int | None = None) -> Run:
    """Open (create or resume) the run of ``experiment`` with ``config`` under ``root/experiment/<hash12>/``.

    ``shard=r`` (r >= 1) makes `Run.append` write rank r's shard ``records.rank<r>.jsonl`` instead of records.jsonl.
    Raises ValueError if that directory already holds a different configuration.
    """
    _check_name(experiment)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}.")
    canon = json.loads(canonical_json(config))
    digest = config_hash(config)
    key = digest[:12]
    d = Path(root).expanduser() / experiment / key
    d.mkdir(parents=True, exist_ok=True)
    cfg_path = d / "config.json"
    prov = provenance()
    if cfg_path.exists():
        try:
            existing = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise ValueError(f"{cfg_path} is not valid JSON; delete the folder {d} or restore the file.") from None
        if existing.get("config") != canon or existing.get("hash", digest) != digest:
            raise ValueError(f"{d} already holds a different configuration (hash collision or edited config.json); "
                             f"move that folder away or restore its config.json.")
    else:
        doc = {"key": key, "hash": digest, "experiment": experiment, "config": canon, "provenance": prov}
        atomic_write_text(cfg_path, json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    run = Run(d, experiment, canon, key, digest, shard=shard)
    done = run.resume()
    with open(d / "sessions.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({**prov, "ids_done_before": done}, default=_json_default) + "\n")
    run.refresh()  # other ranks may append before this one asks what is done
    return run


# ----------------------------------------------------------------------------------------------------------------
# siblings: runs that differ only in their questions
# ----------------------------------------------------------------------------------------------------------------
#: the parts of a run's configuration that say which questions it ran (the dataset's ids, their count and content
#: fingerprint, and the draw's dev/test counts from `book.chapter.load_split`); two runs equal in all the rest are
#: siblings, and a question's records in one are what the other would compute for it
QUESTION_FIELDS = ("ids", "n", "fingerprint")
DRAW_META = ("dev", "test")


def sibling_key(config: Mapping[str, Any]) -> str:
    """The hash of ``config`` without the fields that name its questions (`QUESTION_FIELDS`, `DRAW_META`).

    >>> a = {"experiment": "m", "dataset": {"name": "world", "ids": ["q1"], "n": 1, "meta": {"test": 0}}}
    >>> b = {"experiment": "m", "dataset": {"name": "world", "ids": ["q1", "q2"], "n": 2, "meta": {"test": 1}}}
    >>> sibling_key(a) == sibling_key(b), config_hash(a) == config_hash(b)
    (True, False)
    """
    c = json.loads(canonical_json(config))
    ds = {k: v for k, v in (c.get("dataset") or {}).items() if k not in QUESTION_FIELDS}
    ds["meta"] = {k: v for k, v in (ds.get("meta") or {}).items() if k not in DRAW_META}
    return config_hash({**c, "dataset": ds})


def adopt(run: Run, ids: Iterable[Any]) -> int:
    """Copy into ``run`` the records of the questions ``ids`` that its siblings under the same experiment folder
    already hold (runs whose configuration differs only in its questions, `sibling_key`); returns how many
    questions were adopted. A chapter that runs a pilot and then a larger draw, or two chapters whose draws overlap,
    thus compute each question once. Only for experiments whose records depend on the question alone, not on the
    rest of its batch or on a random stream shared across batches (`experiments.harness.Spec.per_question`); the
    adopted records may differ from a fresh computation by float rounding of a different batch's padding.
    """
    want = [str(i) for i in ids]
    missing = set(want) - run.done_ids()
    if not missing:
        return 0
    key = sibling_key(run.config)
    found: dict[str, list[dict]] = {}
    for cfg in sorted(run.dir.parent.glob("*/config.json")):
        if len(found) == len(missing):
            break
        if cfg.parent == run.dir:
            continue
        try:
            doc = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # a folder being written, or not a run: nothing to adopt from it
        if doc.get("experiment") != run.experiment or sibling_key(doc.get("config") or {}) != key:
            continue
        sib = Run(cfg.parent, run.experiment, doc["config"], doc.get("key", ""), doc.get("hash", ""))
        here: dict[str, list[dict]] = {}
        for r in sib._iter_records():
            rid = str(r.get("id"))
            if rid in missing and rid not in found:
                here.setdefault(rid, []).append(r)
        found.update(here)
    taken = [i for i in dict.fromkeys(want) if i in found]
    for i in taken:
        run.append(found[i])
    return len(taken)

