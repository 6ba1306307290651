"""A smoke test of benchmarks/compare.py: one small model, one seed, one epoch each, tfmot included
where it is installed. It checks the shape of the report and that its figures are sane, not the
figures themselves."""

import importlib.util
import os

import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_benchmark", os.path.join(BENCHMARKS, "compare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_cnn_matches_the_demo_network(compare):
    import keras

    from kerasq.demo import build_model

    ours, demo = compare.digits_cnn(keras), build_model()
    assert [w.shape for w in ours.weights] == [w.shape for w in demo.weights]
    assert [type(layer) for layer in ours.layers] == [type(layer) for layer in demo.layers]


def test_one_model_one_seed(compare, tmp_path):
    result = compare.main(["--models", "digits_cnn", "--seeds", "0", "--quick", "--output-dir", str(tmp_path)])
    markdown = (tmp_path / "compare.md").read_text()
    assert markdown == result["markdown"]
    for heading in ("## Accuracy", "## Parity and training cost", "## Files", "## Targets", "Machine: "):
        assert heading in markdown
    for column in ("| model | epochs (float + QAT) | float | PTQ int8 | kerasq QAT int8 | tfmot QAT int8 |",
                   "kerasq step ratio | tfmot step ratio | kerasq export s | tfmot export s"):
        assert column in markdown
    lines = markdown.splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("| digits_cnn |")]
    assert len(rows) == 3  # one per table, each under its header and separator
    for i in rows:
        assert lines[i - 1].startswith("|---") and lines[i].count("|") == lines[i - 2].count("|")

    (summary,) = result["summaries"]
    assert summary["parity"]["kerasq"][0]["passed"] in (True, False)
    tfmot = compare.tfmot_available()
    assert (summary["tfmot_status"] is None) == tfmot, summary["tfmot_status"]
    kinds = compare.KINDS if tfmot else ("float32", "ptq", "kerasq")
    for kind in kinds:
        (value,) = summary["accuracy"][kind]
        assert 0.0 <= value <= 1.0
        files = summary["files"][kind]
        assert files["size"] > 0 and files["gzip"] > 0
        assert files["latency_1"] > 0 and files["latency_2"] > 0
    for kind in kinds[1:]:
        assert summary["files"][kind]["size"] < summary["files"]["float32"]["size"]
        assert summary["files"][kind]["float_ops"] == []  # fully int8
    for toolkit in ("kerasq", "tfmot") if tfmot else ("kerasq",):
        (parity,) = summary["parity"][toolkit]
        assert 0.0 <= parity["agreement"] <= 1.0 and parity["max_diff"] >= 0.0
        assert parity["floor_max_diff"] >= 0.0 and 0.0 <= parity["floor_agreement"] <= 1.0
        (ratio,) = summary["step_ratio"][toolkit]
        assert ratio > 0
        (seconds,) = summary["export_seconds"][toolkit]
        assert seconds > 0
    if not tfmot:
        assert "not installed" in lines[rows[0]]
    assert isinstance(result["misses"], list)
    assert all(line.startswith("- Missed: ") for line in markdown.splitlines() if "Missed" in line)
    assert np.isfinite(summary["step_ratio"]["kerasq"][0])
    assert [os.path.basename(p) for p in result["plots"]] in ([], ["compare.png", "compare_cost.png"])
