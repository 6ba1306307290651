"""The examples in kerasq's docstrings run as written: every module's doctests, one test per module.

Each module's examples run in a fresh namespace (so they import what they use, as a reader copying
them would), from an empty working directory that they must leave empty (examples that write files
use a temporary directory), with NumPy and Keras seeded.
"""

import doctest
import importlib
import logging
import pkgutil

import numpy as np
import pytest

import kerasq

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(kerasq.__path__, prefix="kerasq.") if info.name != "kerasq.__main__"
)
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.fixture
def quiet_seeded_tmp_cwd(tmp_path, monkeypatch):
    import keras

    monkeypatch.chdir(tmp_path)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    np.random.seed(0)
    keras.utils.set_random_seed(0)
    return tmp_path


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name, quiet_seeded_tmp_cwd):
    module = importlib.import_module(module_name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, module_name, globs={"__name__": module_name})
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} docstring examples in {module_name} failed:\n" + "".join(report)
    left_behind = sorted(path.name for path in quiet_seeded_tmp_cwd.iterdir())
    assert not left_behind, f"{module_name}'s examples left files in the working directory: {left_behind}"
