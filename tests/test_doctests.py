"""Run the `>>>` examples of every module of `hf_entropy_callback` (subpackages included) and `analysis`
as doctests.

Modules are collected with `pkgutil` (those whose source holds a `>>>`), so a new module's examples
run without touching this file; the modules whose examples must not silently disappear are listed
in `MUST_HAVE_EXAMPLES`.
"""

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import analysis
import hf_entropy_callback

PACKAGES = (hf_entropy_callback, analysis)
MUST_HAVE_EXAMPLES = {
    "hf_entropy_callback.schedule",
    "hf_entropy_callback.entropy",
    "hf_entropy_callback.trainer",
    "hf_entropy_callback.dynamics",
    "hf_entropy_callback.inference",
    "hf_entropy_callback.agreement",
    "hf_entropy_callback.labels",
    "hf_entropy_callback.tracker",
    "hf_entropy_callback.study.figures",
    "hf_entropy_callback.study.instruments",
    "hf_entropy_callback.synthetic_runs",
    "hf_entropy_callback.study.tables",
    "hf_entropy_callback.cartography",
    "hf_entropy_callback.train_dynamics",
}
# Modules that import torch at the top; skipped, with the reason, only where torch is not installed.
NEEDS_TORCH = {
    "hf_entropy_callback.callback",
    "hf_entropy_callback.tracker",
    "hf_entropy_callback.trainer",
    "hf_entropy_callback.offline",
    "hf_entropy_callback.peft_setup",
    "hf_entropy_callback.testing",
    "hf_entropy_callback.nli_metric",
    "hf_entropy_callback.train_dynamics",
}
# Known failing examples in files outside this change, each with the fix it needs.
KNOWN_FAILURES: dict = {}


def _modules():
    """Modules of the packages whose source has an example, found without importing them."""
    names = []
    for pkg in PACKAGES:
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.ispkg:
                continue
            with open(info.module_finder.find_spec(info.name).origin, encoding="utf-8") as fh:
                if ">>>" in fh.read():
                    names.append(info.name)
    return sorted(names)


def _params():
    for name in _modules():
        marks = []
        if name in KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=False))
        yield pytest.param(name, marks=marks, id=name)


def test_the_listed_modules_exist():
    assert MUST_HAVE_EXAMPLES <= set(_modules())


@pytest.mark.parametrize("name", list(_params()))
def test_module_examples(name):
    if name in NEEDS_TORCH and importlib.util.find_spec("torch") is None:
        pytest.skip(f"{name} imports torch, which is not installed")
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = [t for t in finder.find(module, name) if t.examples]
    assert tests, f"{name} has a >>> in its source but doctest finds no example"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (see the output)"
