"""What every experiment shares: answering (greedy, batched, chat template + post-prompt), scoring, and the loop
that streams per-sample records into a resumable run directory.

An experiment is a function ``per_batch(lm, samples) -> list[record]``; `run_experiment` feeds it the samples not
yet recorded, in batches, with a progress bar, appends each sample's records as soon as its batch completes, and
returns all records as a DataFrame. The run directory is keyed by a hash of everything that decides a number:
model fingerprint, dataset fingerprint and sample ids, prompt, decoding, seed, dtype and the experiment's own
parameters; library versions are stored beside it (``config.json``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import __version__, distributed
from ..data import SampleSet
from ..engine import intervene
from ..metrics import benchmark_accuracy, score as score_answer
from ..prompts import POST_PROMPT


def post_prompt_for(dataset: SampleSet) -> str:
    """The dataset's post-prompt (lmms-eval's per-benchmark one; the default for the world)."""
    try:
        from ..data.benchmarks import POST_PROMPTS

        return POST_PROMPTS.get(dataset.name, POST_PROMPT)
    except ImportError:  # pragma: no cover
        return POST_PROMPT


@dataclass
class Decoding:
    """Greedy short answers by default (lmms-eval): max_new_tokens=16, no sampling."""

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def kwargs(self, tokenizer) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is not None:
            kw["pad_token_id"] = pad
        return kw


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def decode_new(lm, batch, out: torch.Tensor) -> list[str]:
    """Decode only the generated tokens of a `generate` output, stripped."""
    new = out[:, batch.inputs["input_ids"].shape[1]:]
    texts = lm.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    return [t.strip() for t in texts]


@torch.no_grad()
def generate(lm, batch, plans: Sequence = (), decoding: Decoding | None = None, *, first_logits: bool = False):
    """Greedy (or sampled) answers for a prepared batch, with ``plans`` installed for prefill and every step.
    ``first_logits``: also the logits the first answer token was chosen from (float32 [batch, vocab]; the prefill's
    last position, read from the same generate call, no extra pass)."""
    decoding = decoding or Decoding()
    kw = decoding.kwargs(lm.processor.tokenizer)
    if first_logits:
        kw.update(output_logits=True, return_dict_in_generate=True)
    with intervene(lm, batch, *plans):
        out = lm.model.generate(**batch.inputs, **kw)
    if not first_logits:
        return decode_new(lm, batch, out)
    return decode_new(lm, batch, out.sequences), out.logits[0].float()


def gold_token_ids(lm, samples) -> torch.Tensor:
    """The first token id of each sample's (first) gold answer, as the model would generate it, on its device."""
    return torch.tensor(first_token_ids(lm, [s.answers[0] if s.answers else "" for s in samples]), device=lm.device)


def gold_logprobs(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """The log-probability (float32) of each sample's gold first token ``gold`` ([batch], `gold_token_ids`) under
    ``logits`` ([..., batch, vocab]; e.g. one row per layer first): the paired, low-noise measure the verdicts
    prefer to a 0/1 score."""
    idx = gold.to(logits.device).expand(*logits.shape[:-1])[..., None]
    return torch.log_softmax(logits.float(), -1).gather(-1, idx)[..., 0]


def answer(lm, samples, *, plans: Sequence = (), post_prompt: str | None = POST_PROMPT,
           decoding: Decoding | None = None, batch_size: int = 8, images=None, questions=None,
           progress: bool = False) -> list[str]:
    """Answers to ``samples`` (optionally with other images / questions / interventions), batched."""
    samples = list(samples)
    out: list[str] = []
    it = range(0, len(samples), batch_size)
    for i in tqdm(it, desc="answering", disable=not progress):
        chunk = samples[i:i + batch_size]
        b = lm.prepare(chunk, post_prompt=post_prompt,
                       images=None if images is None else images[i:i + batch_size],
                       questions=None if questions is None else questions[i:i + batch_size])
        out += generate(lm, b, plans, decoding)
    return out


def score(dataset: SampleSet, pred: str, sample) -> float:
    return float(score_answer(dataset.scorer, pred, sample))


def scorer_of(ctx=None, scorer: str | None = None) -> str | None:
    """The scorer a summary aggregates with: ``scorer`` when given, else the run's dataset's (``ctx.dataset``)."""
    if scorer is not None:
        return scorer
    dataset = getattr(ctx, "dataset", None)
    return getattr(dataset, "scorer", None)


def accuracy_by(records: pd.DataFrame, keys: Sequence[str], scorer: str | None,
                columns: dict[str, str] | None = None) -> pd.DataFrame:
    """Per group of ``keys`` (in order of appearance): each ``{output column: score column}`` of ``columns``
    (default ``{"accuracy": "score"}``) aggregated as the benchmark reports it (`metrics.benchmark_accuracy`:
    CircularEval over the group's rows for MMBench's ``option`` scorer, else their mean). Every summary that shows
    an accuracy goes through here, so a method and plain with equal row scores always get equal accuracy."""
    columns = columns or {"accuracy": "score"}
    rows = []
    for k, g in records.groupby(list(keys), sort=False, dropna=False):
        k = k if isinstance(k, tuple) else (k,)
        row = dict(zip(keys, k))
        for out, col in columns.items():
            row[out] = benchmark_accuracy(g["id"], g[col], scorer)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*keys, *columns])


def first_token_ids(lm, texts: Sequence[str]) -> list[int]:
    """The first token id of each text as the model would generate it (no special tokens)."""
    tok = lm.processor.tokenizer
    ids = []
    for t in texts:
        enc = tok(t, add_special_tokens=False)["input_ids"] if t else []
        ids.append(int(enc[0]) if enc else int(tok.eos_token_id if tok.eos_token_id is not None else 0))
    return ids


@dataclass
class ExperimentResult:
    """Per-sample records (tidy), a summary table, and where they live on disk (None for in-memory runs)."""

    name: str
    records: pd.DataFrame
    summary: pd.DataFrame
    config: dict
    run_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def _repr_html_(self):  # notebooks show the summary
        return f"<b>{self.name}</b> ({len(self.records)} records)" + self.summary._repr_html_()


def base_config(lm, dataset: SampleSet, *, experiment: str, seed: int, decoding: Decoding | None,
                post_prompt: str | None, params: dict) -> dict:
    """Everything that decides the numbers of a run (hashed into its directory name)."""
    import transformers

    from ..runs import package_source_hash

    return {
        "experiment": experiment,
        "model": {"name": lm.name, "fingerprint": lm.fingerprint, "arch": lm.spec.model_type,
                  "dtype": str(lm.dtype).replace("torch.", ""), "device_type": lm.device.type,
                  "attn_implementation": lm.meta.get("attn_implementation")},
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(), "n": len(dataset),
                    "ids": dataset.ids, "scorer": dataset.scorer, "meta": {k: v for k, v in dataset.meta.items()
                                                                              if isinstance(v, (str, int, float, list, tuple))}},
        "prompt": {"post_prompt": post_prompt, "style": lm.spec.prompt},
        "decoding": None if decoding is None else vars(decoding),
        "seed": seed,
        "params": params,
        "versions": {"fusion_utils": __version__, "fusion_utils_source": package_source_hash()[:16],
                     "torch": torch.__version__, "transformers": transformers.__version__},
    }


def record_batch(run, chunk, records: list[dict]) -> None:
    """Append a batch's records to ``run`` (if any), one write per sample: a sample is recorded whole or not at all,
    and a sample that yielded no record is marked empty so a resumed run does not redo it."""
    if run is None:
        return
    by_id: dict[str, list[dict]] = {}
    for rec in records:
        by_id.setdefault(str(rec["id"]), []).append(rec)
    for s in chunk:
        run.append(by_id.get(str(s.id), [{"id": s.id, "empty": True}]))


def run_experiment(name: str, lm, dataset: SampleSet, per_batch: Callable, *, config: dict, out: str | None = None,
                   batch_size: int = 8, seed: int = 0, progress: bool = True, adopt: bool = False) -> pd.DataFrame:
    """Feed the samples not yet recorded to ``per_batch`` and return every record.

    With ``out`` set, records go to ``out/<name>/<config hash>/records.jsonl`` as each batch completes, and a run
    killed midway resumes where it stopped. Without it, records stay in memory. ``adopt``: first copy the records
    that sibling runs (the same configuration on other questions) hold for these questions (`runs.adopt`).

    Under a launcher (torchrun, accelerate launch) the ranks share the work: see `run_distributed`.
    """
    if distributed.setup():
        return run_distributed(name, lm, dataset, per_batch, config=config, out=out, batch_size=batch_size,
                               seed=seed, progress=progress, adopt=adopt)
    run = None
    done: set[str] = set()
    if out is not None:
        from ..runs import adopt as adopt_records, open_run

        run = open_run(out, name, config)
        if adopt:
            adopt_records(run, dataset.ids)
        done = run.done_ids()
    todo = [s for s in dataset if str(s.id) not in done]
    rows: list[dict] = []
    seed_everything(seed)
    bar = tqdm(total=len(todo), desc=f"{name} [{lm.spec.model_type}]", disable=not progress, unit="sample")
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        records = per_batch(lm, chunk)
        record_batch(run, chunk, records)
        rows += records
        bar.update(len(chunk))
    bar.close()
    if run is not None:
        run.merge_shards()  # a data-parallel run resumed here in one process: its shards join records.jsonl
        run.clear_notes()  # and its progress and failure notes go
        df = run.records()
        if "empty" in df.columns:
            df = df[df["empty"].isna()].drop(columns=["empty"])
        df.attrs["run_dir"] = str(run.dir)
        return df.reset_index(drop=True)
    return pd.DataFrame(rows)


def failed_sample(lm, per_batch: Callable, chunk, err: BaseException) -> tuple[str, BaseException]:
    """Which sample of a failed batch raised, and its error: the batch's samples are retried one at a time (a
    failure path only), so the message names one sample id rather than a whole batch."""
    if len(chunk) > 1:
        for s in chunk:
            try:
                per_batch(lm, [s])
            except Exception as e:  # noqa: BLE001 - any error is the one to report
                return f"sample {s.id!r}", e
    if len(chunk) == 1:
        return f"sample {chunk[0].id!r}", err
    return f"the batch of samples {[s.id for s in chunk]!r}", err


def open_rank_run(out: str, name: str, config: dict, adopt_ids=None):
    """This rank's view of a data-parallel run: rank 0 opens it, merges what a killed run left, clears old notes and
    adopts the siblings' records of ``adopt_ids`` (if given); after a barrier the other ranks open their shards."""
    from ..runs import adopt, open_run

    r = distributed.rank()
    if r == 0:
        run = open_run(out, name, config)
        run.merge_shards()  # an earlier run killed before its merge
        run.clear_notes()  # an earlier session's progress and failures are not this one's
        if adopt_ids is not None:
            adopt(run, adopt_ids)
    distributed.barrier()
    return run if r == 0 else open_run(out, name, config, shard=r)


def run_distributed(name: str, lm, dataset: SampleSet, per_batch: Callable, *, config: dict, out: str | None,
                    batch_size: int, seed: int, progress: bool, adopt: bool = False) -> pd.DataFrame:
    """`run_experiment` on one rank of a data-parallel job (every rank calls it with the same arguments).

    - Split: the samples not yet recorded are cut into batches exactly as one process would cut them; batch k goes
      to rank k mod W. A fresh run thus computes every sample in the same batch as one process does (equal values).
    - Write: rank 0 appends to records.jsonl, rank r to records.rank<r>.jsonl; before starting, rank 0 merges any
      shards an earlier, killed run left, and only then (after a barrier) do the ranks read what is done, so a run
      resumes with any number of ranks and recomputes nothing.
    - Progress and failure: the ranks do not wait for each other between batches (a slow batch on one rank holds
      up no other). Each notes its count of finished samples in the run directory, and rank 0's bar counts them
      all. A rank that raises notes its error there and stops; the others stop after their current batch. Then all
      ranks exchange their counts and errors (bounded by the group's timeout), and every rank raises `RankFailed`
      with the failing rank's message and sample id. Without a run directory a failure surfaces at that exchange.
    - Merge: after the exchange rank 0 appends the shards to records.jsonl; after a barrier every rank reads the
      merged records (in dataset order), so each returns the same table.
    """
    r, world = distributed.rank(), distributed.world_size()
    run = None if out is None else open_rank_run(out, name, config, dataset.ids if adopt else None)
    done: set[str] = set() if run is None else run.done_ids()
    todo = [s for s in dataset if str(s.id) not in done]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    mine: list[tuple[int, list[dict]]] = []
    seed_everything(seed)
    bar = tqdm(total=len(todo), desc=f"{name} [{lm.spec.model_type}] x{world} ranks",
               disable=not progress or r != 0, unit="sample")
    finished, error, cause = 0, None, None
    for index in distributed.shard(len(batches)):
        if run is not None and run.failures():
            break  # another rank failed: stop here, the exchange below reports its error
        chunk = batches[index]
        try:
            records = per_batch(lm, chunk)
            record_batch(run, chunk, records)
            mine.append((index, records))
        except Exception as err:  # noqa: BLE001 - reported to every rank below, then raised
            where, cause = failed_sample(lm, per_batch, chunk, err)
            error = f"rank {r} failed on {where} of {name}: {type(cause).__name__}: {cause}"
            if run is not None:
                run.note_failure(r, error)
            break
        finished += len(chunk)
        if run is None:
            bar.update(len(chunk))
        elif r == 0:
            bar.update(finished + sum(n for k, n in run.progress().items() if k != 0) - bar.n)
        else:
            run.note_progress(r, finished)
    statuses = distributed.step(finished, error)  # every rank, failed or not, meets here: nobody waits forever
    message = distributed.failure(statuses)
    if message is not None:
        bar.close()
        raise distributed.RankFailed(message) from cause
    bar.update(sum(s.done for s in statuses) - bar.n)
    bar.close()
    if run is None:
        parts = [p for rank_parts in distributed.gather_objects(mine) for p in rank_parts]
        return pd.DataFrame([rec for _, records in sorted(parts, key=lambda p: p[0]) for rec in records])
    if r == 0:
        run.merge_shards()
        run.clear_notes()
    distributed.barrier()
    df = run.records()
    if "empty" in df.columns:
        df = df[df["empty"].isna()].drop(columns=["empty"])
    order = {str(i): n for n, i in enumerate(dataset.ids)}  # dataset order, as a fresh single-process run has it
    df = df.iloc[np.argsort([order.get(str(i), len(order)) for i in df["id"]], kind="stable")]
    df.attrs["run_dir"] = str(run.dir)
    return df.reset_index(drop=True)


def finish(name: str, records: pd.DataFrame, summary: pd.DataFrame, config: dict, **extra) -> ExperimentResult:
    run_dir = records.attrs.get("run_dir")
    if run_dir is not None and distributed.is_main():  # one writer: rank 0 under a launcher
        from ..runs import atomic_write_text  # noqa: F401  (summary written atomically below)
        from pathlib import Path

        path = Path(run_dir) / "summary.csv"
        tmp = summary.to_csv(index=False)
        atomic_write_text(path, tmp)
    return ExperimentResult(name, records, summary, config, run_dir, extra)


__all__ = ["Decoding", "answer", "generate", "decode_new", "score", "scorer_of", "accuracy_by", "first_token_ids", "gold_token_ids", "gold_logprobs",
           "run_experiment", "base_config", "post_prompt_for", "ExperimentResult", "finish", "seed_everything", "run_distributed",
           "failed_sample"]
