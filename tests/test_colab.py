"""The Colab tutorials run top to bottom: every code cell of each notebook, in order, in one namespace."""

import json
import pathlib
import re

import pytest

COLAB = pathlib.Path(__file__).resolve().parent.parent / "colab"
NOTEBOOK = COLAB / "01_qat_int8_tflite.ipynb"


def code_cells(path):
    """The notebook's code cells as Python source, with IPython magics (`%...`, `!...`) made no-ops."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4, f"{path.name} is not an nbformat v4 notebook"
    sources = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        sources.append(re.sub(r"(?m)^(\s*)[%!].*$", r"\1pass", source))
    return sources


def test_every_notebook_is_valid_json_with_code():
    notebooks = sorted(COLAB.glob("*.ipynb"))
    assert NOTEBOOK in notebooks
    for path in notebooks:
        assert code_cells(path), f"{path.name} has no code cells"


def test_qat_tutorial_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the tutorial writes its files to the working directory
    namespace = {"__name__": "__main__"}
    for index, source in enumerate(code_cells(NOTEBOOK)):
        try:
            exec(compile(source, f"{NOTEBOOK.name}[code cell {index}]", "exec"), namespace)
        except Exception as error:  # name the failing cell
            pytest.fail(f"code cell {index} of {NOTEBOOK.name} failed: {type(error).__name__}: {error}")

    for name in ("float_accuracy", "ptq_accuracy", "qat_keras_accuracy", "qat_accuracy"):
        assert 0.9 <= namespace[name] <= 1.0, f"{name} = {namespace[name]}"
    assert abs(namespace["qat_accuracy"] - namespace["float_accuracy"]) <= 0.02
    assert namespace["tflite"].is_fully_integer
    assert namespace["report"].passed, str(namespace["report"])
    for name in ("model_float32.tflite", "model_ptq_int8.tflite", "model_qat_int8.tflite"):
        assert (tmp_path / "qat_tutorial" / name).stat().st_size > 0
