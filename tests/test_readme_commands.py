"""README.md starts with the two commands that work from a fresh clone, .ci/run runs the second one,
and the README's Python examples run as written."""

import os
import pathlib
import re
import stat

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"

DEMO_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/kerasq demo"
TEST_COMMAND = 'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest -n 2 tests'


def test_readme_starts_with_the_demo_and_test_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines[0] == DEMO_COMMAND
    assert lines[1] == TEST_COMMAND


def test_ci_runs_exactly_the_readme_test_command():
    text = CI_RUN.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    commands = [
        line.strip() for line in text.splitlines()[1:]
        if line.strip() and not line.lstrip().startswith("#") and line.strip() != "set -euo pipefail"
        and not line.strip().startswith("cd ")
    ]
    assert commands == [README.read_text(encoding="utf-8").splitlines()[1]]
    assert CI_RUN.stat().st_mode & stat.S_IXUSR, ".ci/run is not executable"


def test_test_extra_has_pytest_xdist():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    test_extra = re.search(r"(?m)^test\s*=\s*\[(.*)\]", pyproject).group(1)
    assert "pytest-xdist" in test_extra


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write .tflite files to the working directory
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "no Python examples in README.md"
    namespace = {"__name__": "__main__"}
    for index, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    assert namespace["report"].passed
    assert namespace["tflite"].is_fully_integer
    assert os.path.getsize("model_int8.tflite") > 0 and os.path.getsize("model_ptq_int8.tflite") > 0
    assert namespace["qat_custom"] is not None
