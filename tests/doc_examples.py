"""Run every docstring example of the package, with the names the examples take as given bound to real objects.

``python tests/doc_examples.py [module ...]`` prints each failing example and exits 1 if any fails;
`tests/test_doc_examples.py` runs it in a subprocess, since some examples register an experiment or an attention
function on purpose and the registries of the test process must not see them.

The names: ``lm`` (the shipped organism ``llava-8l``, loaded as a `LoadedModel`), ``model`` and ``processor`` (the
same organism unwrapped), ``ds`` (8 `world` test questions), ``s`` and ``sample`` (its first question), ``batch``
(its first two, prepared by ``lm.prepare``) and ``load_dataset``.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil
import sys

import torch

import fusion_utils

# modules that only run inside a Sphinx build or as a program: importing them outside one has effects
SKIP = ("fusion_utils._sphinx_",)


def given_names() -> dict:
    """The objects the examples use without defining them."""
    from fusion_utils import organism_registry
    from fusion_utils.data import load_dataset
    from fusion_utils.models import LoadedModel

    model, processor = organism_registry.load("llava-8l")
    lm = LoadedModel.wrap(model, processor, name="llava-8l")
    ds = load_dataset("world", n=8)
    return {"lm": lm, "model": model, "processor": processor, "ds": ds, "s": ds[0], "sample": ds[0],
            "batch": lm.prepare(list(ds)[:2]), "load_dataset": load_dataset}


def modules(names: list[str]) -> list:
    if names:
        return [importlib.import_module(n) for n in names]
    found = [fusion_utils]
    for info in pkgutil.walk_packages(fusion_utils.__path__, prefix="fusion_utils."):
        if not info.name.startswith(SKIP) and not info.name.endswith("__main__"):
            found.append(importlib.import_module(info.name))
    return found


def main(argv: list[str]) -> int:
    torch.manual_seed(0)
    given = given_names()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    finder, failed, tried = doctest.DocTestFinder(), 0, 0
    for mod in modules(argv):
        for test in finder.find(mod, globs={**vars(mod), **given}):
            if not test.examples:
                continue
            runner = doctest.DocTestRunner(optionflags=flags)
            runner.run(test)
            r = runner.summarize(verbose=False)
            failed += r.failed
            tried += r.attempted
    print(f"{tried} examples run, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
