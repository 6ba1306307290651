"""The Colab tutorials in colab/: each runs top to bottom in a real Jupyter kernel, in fast mode.

Every notebook in colab/ is picked up (one test per file). The kernel runs this test's own
interpreter (`sys.executable`, through a kernel spec written for the test), with `KERASQ_FAST=1`, in
an empty working directory. A notebook checks its own promises in its last cells (`assert`), so a
wrong result fails it like an exception does; the failure names the notebook and the cell.

The conventions every notebook follows (badge, setup cell, fast mode, no committed outputs) are in
colab/README.md and checked here. To strip outputs before committing:

    .venv/bin/python tests/test_colab.py --strip colab/*.ipynb
"""

import json
import pathlib
import re
import sys

import pytest

COLAB = pathlib.Path(__file__).resolve().parent.parent / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
REPO = "kerasq/kerasq"  # GitHub owner/name: the badge links and KERASQ_REPO point here
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
CELL_TIMEOUT = 300  # seconds per cell in fast mode; a stuck cell fails instead of hanging the suite
KERNEL_NAME = "kerasq-test-python"


def _source(cell):
    source = cell["source"]
    return "".join(source) if isinstance(source, list) else source


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _ids(path):
    return path.name


def test_colab_has_notebooks():
    assert (COLAB / "01_qat_int8_tflite.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_opens_with_badge_and_setup_cell(path):
    """The first cell is markdown with the Open-in-Colab badge for this very file; the first code
    cell is the shared setup cell: KERASQ_REPO, install from it when kerasq is missing, fast mode."""
    notebook = _load(path)
    assert notebook["nbformat"] == 4, f"{path.name} is not an nbformat v4 notebook"
    cells = notebook["cells"]
    assert cells and cells[0]["cell_type"] == "markdown", f"{path.name}: the first cell must be the badge (markdown)"
    link = f"https://colab.research.google.com/github/{REPO}/blob/main/colab/{path.name}"
    badge = f"[![Open In Colab]({BADGE_IMAGE})]({link})"
    assert badge in _source(cells[0]), f"{path.name}: the first cell must contain {badge}"

    code = [c for c in cells if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cells"
    setup = _source(code[0])
    for needed in (
        f'KERASQ_REPO = "https://github.com/{REPO}"',
        'importlib.util.find_spec("kerasq") is None',
        '"pip", "install"',
        'f"kerasq @ git+{KERASQ_REPO}"',
        'FAST = os.environ.get("KERASQ_FAST") == "1"',
    ):
        assert needed in setup, f"{path.name}: the first code cell is not the setup cell of colab/README.md (no {needed!r})"
    assert "RuntimeError" not in setup, f"{path.name}: the setup cell must install, not stop"
    assert notebook["metadata"].get("colab", {}).get("name") == path.name, (
        f"{path.name}: metadata.colab.name must be the file name"
    )
    assert notebook["metadata"].get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_is_committed_without_outputs(path):
    """Outputs of a run go stale with the next change: notebooks are committed clean."""
    dirty = [
        index
        for index, cell in enumerate(_load(path)["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} have outputs or execution counts; strip them with "
        f"`.venv/bin/python tests/test_colab.py --strip colab/{path.name}`"
    )


@pytest.fixture
def kernel_manager(tmp_path):
    """A kernel manager whose only kernel spec runs this interpreter (the test's virtual environment),
    whatever kernel specs the machine has installed elsewhere."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "kerasq tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    assert specs.get_kernel_spec(KERNEL_NAME).argv[0] == sys.executable
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_runs_in_fast_mode(path, tmp_path, monkeypatch, kernel_manager):
    import nbclient
    import nbformat
    from nbclient.exceptions import CellControlSignal, CellTimeoutError, DeadKernelError

    workdir = tmp_path / "run"
    workdir.mkdir()
    monkeypatch.setenv("KERASQ_FAST", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # figures are drawn and saved, never shown on a screen
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        km=kernel_manager,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(workdir)}},
    )
    failure = None
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, index)
            except (CellControlSignal, CellTimeoutError, DeadKernelError, RuntimeError) as error:
                first_line = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                failure = f"{path.name}, cell {index} ({first_line!r}) failed:\n{_plain(str(error))}"
                break
        setup_output = _text_outputs(next(c for c in notebook.cells if c.cell_type == "code"))
    if failure:
        pytest.fail(failure, pytrace=False)
    # Here kerasq is installed (the test's environment): the setup cell must find it and do nothing.
    assert "is installed" in setup_output and "Installing kerasq" not in setup_output, (
        f"{path.name}: the setup cell did not find the installed kerasq:\n{setup_output}"
    )


def _text_outputs(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _plain(text):
    """Error text without the ANSI colour codes IPython puts in tracebacks."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def strip_outputs(paths):
    """Removes outputs and execution counts from the notebooks at `paths`, in place."""
    for name in paths:
        path = pathlib.Path(name)
        notebook = _load(path)
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                cell["outputs"], cell["execution_count"] = [], None
            cell.get("metadata", {}).pop("execution", None)
        path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"stripped {path}")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--strip":
        sys.exit("usage: python tests/test_colab.py --strip NOTEBOOK.ipynb ...")
    strip_outputs(sys.argv[2:])
