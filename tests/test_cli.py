"""The `kerasq` command and the demo behind it (kerasq/cli.py, kerasq/demo.py)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from kerasq.demo import FIGURE_FILE, FILES, QAT_KERAS_FILE, run_demo, save_figure

ROWS = ("float32", "PTQ int8", "QAT int8")


def kerasq_command(*args, cwd=None, timeout=300):
    """Runs `python -m kerasq ARGS` in a fresh process and returns the CompletedProcess."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "kerasq", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """run_demo with one epoch of each training: fast, and enough to check the plumbing."""
    output_dir = tmp_path_factory.mktemp("demo")
    lines = []
    environ = dict(os.environ)
    figures = run_demo(output_dir, epochs=1, qat_epochs=1, seed=0, log=lines.append)
    assert dict(os.environ) == environ, "run_demo changed environment variables"
    return output_dir, figures, lines


def test_demo_writes_the_three_files_and_the_qat_model(tiny_demo):
    output_dir, figures, _ = tiny_demo
    for key, name in FILES.items():
        path = output_dir / name
        assert path.stat().st_size > 0
        assert figures[key]["path"] == str(path)
    assert (output_dir / QAT_KERAS_FILE).stat().st_size > 0


def test_demo_int8_files_are_fully_integer(tiny_demo):
    from kerasq import TFLiteModel

    output_dir, figures, _ = tiny_demo
    assert TFLiteModel(str(output_dir / FILES["qat"])).is_fully_integer
    assert figures["qat"]["fully_integer"] and figures["ptq"]["fully_integer"]
    assert not figures["float"]["fully_integer"]
    assert figures["qat"]["size_bytes"] < figures["float"]["size_bytes"] / 2


def test_demo_prints_progress_one_table_and_the_comparison(tiny_demo):
    _, figures, lines = tiny_demo
    text = "\n".join(lines)
    for step in range(1, 6):
        assert f"[{step}/5]" in text
    table = figures["table"]
    assert table in text and text.count(table.splitlines()[0]) == 1
    rows = [line for line in table.splitlines() if line.startswith(ROWS)]
    assert [row.split("  ")[0].strip() for row in rows] == list(ROWS)
    comparison = figures["comparison"]
    assert comparison in text
    assert comparison.startswith("QAT int8 accuracy ") and " vs PTQ " in comparison and " vs float " in comparison
    assert ">=" not in comparison and "within" not in comparison  # what was measured, not a promise


def test_demo_figures_are_sane(tiny_demo):
    _, figures, _ = tiny_demo
    for key in FILES:
        f = figures[key]
        for name in ("tflite_accuracy", "agreement", "floor_agreement"):
            assert 0.0 <= f[name] <= 1.0, (key, name, f[name])
        assert f["latency_ms"] > 0 and f["size_kb"] > 0
        assert f["max_steps"] >= 0 and f["floor_max_steps"] >= 0
    assert figures["ptq"]["keras_accuracy"] is None
    for key in ("float", "qat"):
        assert 0.0 <= figures[key]["keras_accuracy"] <= 1.0
    # The float32 file computes what Keras computes; the QAT file what its int8 simulation computes.
    assert figures["float"]["tflite_accuracy"] == pytest.approx(figures["float"]["keras_accuracy"], abs=0.005)
    assert figures["qat"]["parity_passed"], figures["table"]
    for key, other in (("qat_minus_ptq", "ptq"), ("qat_minus_float", "float")):
        expected = figures["qat"]["tflite_accuracy"] - figures[other]["tflite_accuracy"]
        assert figures[key] == pytest.approx(expected), key


def test_full_demo_qat_is_as_accurate_as_ptq_and_float(tmp_path):
    """The demo at its default settings: QAT int8 about as accurate as PTQ int8, and within 1 point of float.

    Float results differ between CPUs, so training, and each file's accuracy, differ by a test image
    or two between machines: QAT may land an image or two behind PTQ on one seed (whether QAT beats
    PTQ on average is a question for many seeds, not one). The margins are two test images.
    """
    figures = run_demo(tmp_path, seed=0, log=lambda line: None)
    message = f"\n{figures['table']}\n{figures['comparison']}"
    two_images = 2 / 450  # the digits test split has 450 images
    float_acc = figures["float"]["tflite_accuracy"]
    ptq_acc = figures["ptq"]["tflite_accuracy"]
    qat_acc = figures["qat"]["tflite_accuracy"]
    assert float_acc >= 0.97, message
    assert qat_acc >= ptq_acc - two_images, message
    assert abs(qat_acc - float_acc) <= 0.01 + two_images, message
    assert figures["qat"]["fully_integer"] and figures["qat"]["parity_passed"], message
    assert figures["qat"]["keras_accuracy"] == pytest.approx(qat_acc, abs=0.005), message


def test_demo_draws_its_table_as_a_png_or_says_it_skipped(tiny_demo, tmp_path, monkeypatch):
    output_dir, figures, lines = tiny_demo
    pytest.importorskip("matplotlib")  # in the test extra
    assert figures["figure"] == str(output_dir / FIGURE_FILE)
    assert (output_dir / FIGURE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("Figure of the table:") for line in lines)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    assert save_figure(figures, str(tmp_path / "f.png")) is None and not (tmp_path / "f.png").exists()


def test_demo_rejects_zero_epochs(tmp_path):
    with pytest.raises(ValueError, match="epochs"):
        run_demo(tmp_path, epochs=0, log=lambda line: None)


# ---- the command line -------------------------------------------------------------------------------
# Most checks call kerasq.cli.main in this process (flags set as if parsed): a `python -m kerasq`
# subprocess costs about 5 s of TensorFlow import. A few run the command as a user does.


def run_cli(capsys, *args, **flag_values):
    """`kerasq ARGS --flag=value...` in this process: (exit code, stdout, stderr)."""
    from absl.testing import flagsaver

    from kerasq import cli

    capsys.readouterr()
    with flagsaver.as_parsed(**{name: str(value) for name, value in flag_values.items()}):
        code = cli.main(["kerasq", *args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(text):
    return len(text.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["demo", "convert", "inspect", "verify", "bench", "eval", "migrate"])
def test_every_command_has_its_own_help_with_an_example(name, capsys):
    from kerasq.cli import command_help

    code, out, err = run_cli(capsys, "help", name)
    assert code == 0 and not err
    assert out.startswith(f"Usage: kerasq {name}") and out == command_help(name) + "\n"
    example = out.split("Example:\n", 1)[1]
    assert example.strip().startswith(f"kerasq {name}")
    others = [other for other in ("demo", "convert", "inspect", "bench") if other != name]
    assert not any(out.startswith(f"Usage: kerasq {other}") for other in others)


def test_help_version_and_flags_as_a_user_types_them(tmp_path, capsys):
    result = kerasq_command("convert", "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("Usage: kerasq convert MODEL.keras OUT.tflite")
    assert "--float16" in result.stdout and "Example:" in result.stdout and "kerasq bench" not in result.stdout

    result = kerasq_command("--version")
    assert result.returncode == 0 and re.match(r"kerasq \d+\.\d+\.\d+ \(keras 3", result.stdout), result.stdout

    code, out, _ = run_cli(capsys, "help")
    assert code == 0
    for text in ("kerasq demo", "kerasq convert", "kerasq inspect", "kerasq verify", "kerasq bench", "kerasq eval",
                 "kerasq migrate", "kerasq help", "--qat_epochs", "--output_dir", "Exit codes"):
        assert text in out, text


def test_a_bad_flag_is_a_usage_error():
    from kerasq import cli

    with pytest.raises(SystemExit) as exit:
        cli._parse_flags(["kerasq", "--no_such_flag"])
    assert exit.value.code == 2


@pytest.mark.parametrize(
    "args, flag_values, message",
    [
        (["nope"], {}, "unknown command 'nope'"),
        ([], {}, "no command given"),
        (["help", "nope"], {}, "help takes one command name"),
        (["inspect"], {}, "inspect takes one .tflite file"),
        (["bench", "a.tflite", "b.tflite"], {}, "bench takes one .tflite file"),
        (["demo", "extra"], {}, "demo takes no arguments"),
        (["convert", "model.keras"], {}, "convert takes MODEL.keras and OUT.tflite"),
        (["inspect", "a.tflite"], {"runs": 5}, "inspect does not take --runs"),
        (["convert", "m.keras", "o.tflite"], {"float16": True, "dynamic": True}, "choose one of --int8"),
        (["convert", "m.keras", "o.tflite"], {"dynamic": True, "calibration": "c.npy"}, "--calibration is for --int8"),
        (["verify", "m.keras", "f.tflite"], {}, "verify needs --data"),
    ],
)
def test_usage_errors_return_2(args, flag_values, message, capsys):
    code, _, err = run_cli(capsys, *args, **flag_values)
    assert code == 2, err
    assert message in err and "Usage:" in err


def test_missing_and_corrupt_files_are_one_line_errors_naming_the_file(tmp_path, capsys):
    import zipfile

    (tmp_path / "broken.keras").write_bytes(b"not a zip file")
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
        archive.writestr("readme.txt", "a zip, but not from model.save")
    (tmp_path / "broken.tflite").write_bytes(b"\x00" * 64)
    np_file = tmp_path / "no_x.npz"
    __import__("numpy").savez(np_file, inputs=__import__("numpy").zeros((2, 3)))
    out_file = tmp_path / "out.tflite"
    cases = [
        (("convert", str(tmp_path / "broken.keras"), str(out_file)), {}, "broken.keras is not a Keras file"),
        (("convert", str(tmp_path / "other.keras"), str(out_file)), {}, "other.keras is not a Keras file"),
        (("convert", str(tmp_path / "missing.keras"), str(out_file)), {}, "missing.keras: no such file"),
        (("inspect", str(tmp_path / "missing.tflite")), {}, "missing.tflite: no such file"),
        (("inspect", str(tmp_path)), {}, "is a directory"),
        (("inspect", str(tmp_path / "broken.tflite")), {}, "broken.tflite' is not a valid .tflite file"),
        (("eval", str(tmp_path / "broken.tflite")), {}, "not a valid .tflite file"),
        (("eval", str(tmp_path / "broken.tflite")), {"data": str(np_file)}, "no_x.npz has no array 'x'"),
        (("eval", str(tmp_path / "broken.tflite")), {"data": str(tmp_path / "nope.npz")}, "nope.npz: no such file"),
        (("convert", str(tmp_path / "broken.keras"), str(out_file)), {"calibration": str(tmp_path / "broken.tflite")},
         "broken.tflite is not a NumPy"),
    ]
    for args, flag_values, message in cases:
        code, out, err = run_cli(capsys, *args, **flag_values)
        assert code == 1 and message in err and one_line(err), (args, err)
        assert "Traceback" not in err and "not found" not in err.lower(), err
    assert not out_file.exists()


def test_missing_file_error_as_a_user_sees_it(tmp_path):
    result = kerasq_command("inspect", str(tmp_path / "missing.tflite"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"kerasq inspect: error: FILE.tflite {tmp_path / 'missing.tflite'}: no such file."


@pytest.mark.parametrize("command", [["kerasq"], ["python", "-m", "kerasq"]], ids=" ".join)
def test_the_command_output_is_its_own(command, tmp_path):
    """The console script and `python -m kerasq` silence TensorFlow's start-up messages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    program = [os.path.join(os.path.dirname(sys.executable), "kerasq")] if command == ["kerasq"] else [sys.executable, "-m", "kerasq"]
    result = subprocess.run([*program, "inspect", str(tmp_path / "missing.tflite")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    verbose = subprocess.run([*program, "inspect", str(tmp_path / "missing.tflite"), "--verbose"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert verbose.returncode == 1 and verbose.stderr.count("\n") > 1  # TensorFlow's own lines too


def test_convert_modes_of_a_float_model(tmp_path, capsys):
    import keras
    import numpy as np

    from kerasq import TFLiteModel

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(3)])
    model.save(tmp_path / "float.keras")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(size=(64, 32)).astype("float32"))
    keras_file, calib = str(tmp_path / "float.keras"), str(tmp_path / "calib.npy")

    code, out, err = run_cli(capsys, "convert", keras_file, str(tmp_path / "float.tflite"))
    assert code == 0, err
    assert "float32" in out and "Wrote a float32 file" in out and "--int8 --calibration=INPUTS.npy" in out
    assert not TFLiteModel(tmp_path / "float.tflite").is_fully_integer

    code, _, err = run_cli(capsys, "convert", keras_file, str(tmp_path / "x.tflite"), int8=True)
    assert code == 1 and "needs calibration inputs: add --calibration=INPUTS.npy" in err and one_line(err)

    for flag_values, name, text in (
        ({"calibration": calib}, "ptq.tflite", "post-training int8"),
        ({"int8": True, "calibration": calib}, "ptq2.tflite", "post-training int8"),
        ({"int16x8": True, "calibration": calib}, "ptq16x8.tflite", "post-training 16x8"),
        ({"float16": True}, "fp16.tflite", "float16 weights"),
        ({"dynamic": True}, "dynamic.tflite", "dynamic-range int8 weights"),
    ):
        code, out, err = run_cli(capsys, "convert", keras_file, str(tmp_path / name), **flag_values)
        assert code == 0 and text in out and "Wrote a float32" not in out, (flag_values, out, err)
    assert TFLiteModel(tmp_path / "ptq.tflite").is_fully_integer
    assert TFLiteModel(tmp_path / "ptq16x8.tflite").input_details[0]["dtype"] == np.int16
    code, _, err = run_cli(capsys, "convert", keras_file, str(tmp_path / "y.tflite"), int16x8=True)
    assert code == 1 and "--int16x8 for the float model" in err and one_line(err)
    kernels = {name: [w.dtype.name for w in TFLiteModel(tmp_path / name).weights().values() if w.shape == (64, 32)]
               for name in ("fp16.tflite", "dynamic.tflite")}
    assert kernels == {"fp16.tflite": ["float16"], "dynamic.tflite": ["int8"]}


def test_convert_verify_and_eval_the_demo_files(tiny_demo, tmp_path, capsys):
    import numpy as np

    from kerasq import TFLiteModel
    from kerasq.data import load_digits

    output_dir, figures, _ = tiny_demo
    qat_keras, qat_file = str(output_dir / QAT_KERAS_FILE), str(output_dir / FILES["qat"])
    out = tmp_path / "converted.tflite"
    code, stdout, err = run_cli(capsys, "convert", qat_keras, str(out))
    assert code == 0, err
    assert "quantization-aware int8" in stdout and "fully integer" in stdout and TFLiteModel(out).is_fully_integer
    code, _, err = run_cli(capsys, "convert", qat_keras, str(tmp_path / "f.tflite"), float16=True)
    assert code == 1 and "--float16 is for float models" in err and one_line(err)
    code, _, err = run_cli(capsys, "convert", qat_keras, str(tmp_path / "g.tflite"), int16x8=True)
    assert code == 1 and "simulates int8 activations" in err and "--int8" in err and one_line(err)

    _, (x_test, y_test) = load_digits()
    np.savez(tmp_path / "test.npz", x=x_test, y=y_test)
    code, stdout, err = run_cli(capsys, "verify", qat_keras, qat_file, data=tmp_path / "test.npz")
    assert code == 0, stdout + err
    assert "Result: PASSED" in stdout and "Accuracy on y: Keras" in stdout

    code, stdout, err = run_cli(capsys, "eval", qat_file, data=tmp_path / "test.npz")
    assert code == 0, err
    assert f"accuracy {100 * figures['qat']['tflite_accuracy']:.2f}% on the 450 samples of test.npz" in stdout
    np.savez(tmp_path / "onehot.npz", x=x_test, y=np.eye(10)[y_test])
    code, stdout, err = run_cli(capsys, "eval", qat_file, data=tmp_path / "onehot.npz", kernels="reference")
    accuracy = float(re.search(r"accuracy ([\d.]+)%", stdout).group(1))
    # The demo measured with the default (XNNPACK) kernels; the reference kernels round differently,
    # and how often that flips a prediction depends on the CPU: allow two test images.
    assert abs(accuracy - 100 * figures["qat"]["tflite_accuracy"]) <= 100 * 2 / 450 + 0.005, stdout

    code, stdout, err = run_cli(capsys, "eval", qat_file)  # the digits test split
    assert code == 0 and "on the 450 digits test images" in stdout, err

    code, stdout, err = run_cli(capsys, "bench", qat_file, runs=5, warmup=1, threads=1)
    assert code == 0, err
    assert re.search(r"median [\d.]+ ms, p90 [\d.]+ ms, p99 [\d.]+ ms", stdout) and "1 threads" in stdout


def test_verify_fails_with_exit_1_for_another_model(tmp_path, capsys):
    import keras
    import numpy as np

    from kerasq import export_tflite

    keras.utils.set_random_seed(0)
    exported = keras.Sequential([keras.Input((6,)), keras.layers.Dense(10)])
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(10)])  # other random weights
    other.save(tmp_path / "other.keras")
    export_tflite(exported, str(tmp_path / "exported.tflite"))
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).normal(size=(100, 6)).astype("float32"))
    code, out, err = run_cli(capsys, "verify", str(tmp_path / "other.keras"), str(tmp_path / "exported.tflite"),
                             data=tmp_path / "data.npz")
    assert code == 1 and "Result: FAILED" in out and "does not reproduce" in err and one_line(err)


def test_inspect_shows_sparsity_and_distinct_values(tmp_path, capsys):
    import keras
    import numpy as np

    from kerasq import export_tflite

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="sparse")])
    kernel = np.tile(np.array([-0.5, 0.0, 0.5, 0.0], "float32"), (8, 4))  # 50% zeros, 3 distinct values
    model.get_layer("sparse").set_weights([kernel, np.zeros(16, "float32")])
    path = tmp_path / "sparse.tflite"
    export_tflite(model, str(path))
    code, out, err = run_cli(capsys, "inspect", str(path))
    assert code == 0, err
    assert "Weights (constant tensors)" in out and "Size:" in out and "FULLY_CONNECTED" in out
    [row] = [line for line in out.splitlines() if "(16, 8)" in line and "float32" in line and "%" in line]
    assert row.split()[-2:] == ["50.0%", "3"], row


def test_eval_without_data_refuses_a_file_that_does_not_take_digits(tmp_path, capsys):
    import keras

    from kerasq import export_tflite

    path = tmp_path / "not_digits.tflite"
    export_tflite(keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)]), str(path))
    code, _, err = run_cli(capsys, "eval", str(path))
    assert code == 1 and "digits" in err and "--data=DATA.npz" in err and one_line(err)


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import io

    from kerasq.cli import common

    stream = io.StringIO()
    monkeypatch.setattr(common, "_terminal", stream)
    common.Progress("working", 4).update(4)  # not a terminal: nothing
    assert stream.getvalue() == ""
    bar = common.Progress("working", 4, enabled=True)
    bar.update(2)
    bar.update(4)
    assert "working [" in stream.getvalue() and "4/4" in stream.getvalue()
    bar.close()
    assert stream.getvalue().endswith("\r\033[K")


def test_demo_command_end_to_end(tmp_path):
    """`kerasq demo` as installed: the console script when present, else `python -m kerasq`; its output
    through pipes has no progress bars."""
    script = pathlib.Path(sys.executable).with_name("kerasq")
    args = ["demo", "--epochs=1", "--qat_epochs=1", f"--output_dir={tmp_path / 'out'}"]
    if script.exists():
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        result = subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=300)
    else:
        result = kerasq_command(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[5/5]" in result.stdout and "QAT int8 accuracy" in result.stdout
    for row in ROWS:
        assert any(line.startswith(row) for line in result.stdout.splitlines())
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tflite")) == sorted(FILES.values())
    assert "\r" not in result.stdout + result.stderr and "[#" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "epoch 1/1" in result.stdout
