"""Subcommands that read a Keras model: `convert`, `verify` and `migrate`.

Example:
>>> from kerasq.cli.common import COMMANDS
>>> COMMANDS["convert"].usage_line()
'kerasq convert MODEL.keras OUT.tflite [--int8 | --int16x8 [--calibration=INPUTS.npy] | --float16 | --dynamic]'
"""

import os
import warnings

from absl import flags

from kerasq.cli.common import (
    FLAGS,
    CommandError,
    Progress,
    UsageError,
    command,
    load_arrays,
    load_keras_model,
    load_tflite,
    say,
)

flags.DEFINE_boolean("int8", False, "convert: a fully int8 file (a float model needs --calibration).")
flags.DEFINE_boolean(
    "int16x8", False, "convert: 16-bit activations and 8-bit weights (a float model needs --calibration)."
)
flags.DEFINE_string(
    "calibration", None,
    "convert: .npy file (or .npz with x) of typical float model inputs, for post-training int8 or 16x8.",
)
flags.DEFINE_boolean("float16", False, "convert: float16 weights, float32 compute (half the size; for GPU delegates).")
flags.DEFINE_boolean(
    "dynamic", False, "convert: dynamic-range quantization: int8 weights, float activations, no calibration."
)
flags.DEFINE_string("data", None, "verify/eval: .npz file with inputs x (and labels y).")


@command(
    "convert",
    ["MODEL.keras", "OUT.tflite"],
    "export a saved Keras model to .tflite (int8, 16x8, float16, dynamic-range or float32)",
    """Exports a Keras model saved with model.save("model.keras") to a .tflite file:
  a QAT model (kerasq.quantize_model) becomes a fully integer file by itself (16x8 for
  scheme="int16x8");
  a float model with --calibration=INPUTS.npy (and --int8, implied) a post-training int8 file;
  a float model with --int16x8 --calibration=INPUTS.npy a post-training 16x8 file (int16 activations);
  a float model with --float16 a file with float16 weights (half the size; GPU delegates);
  a float model with --dynamic a dynamic-range file (int8 weights, float activations);
  a float model alone a float32 file.
INPUTS.npy holds a few hundred typical model inputs (np.save("inputs.npy", x_train[:300])); an .npz
file with an array x works too.""",
    "kerasq convert model_qat.keras model_int8.tflite\n"
    "kerasq convert model.keras model_ptq_int8.tflite --int8 --calibration=inputs.npy\n"
    "kerasq convert model.keras model_ptq_16x8.tflite --int16x8 --calibration=inputs.npy\n"
    "kerasq convert model.keras model_fp16.tflite --float16",
    ["int8", "int16x8", "calibration", "float16", "dynamic"],
    usage="[--int8 | --int16x8 [--calibration=INPUTS.npy] | --float16 | --dynamic]",
    wrong_count="convert takes MODEL.keras and OUT.tflite; got {n} arguments.",
)
def convert(model_path, out_path):
    from kerasq.export import export_tflite
    from kerasq.export.converter import calibration_progress
    from kerasq.export.modes import mode_text, resolve_mode
    from kerasq.quantization import is_quantized

    chosen = [name for name in ("int8", "int16x8", "float16", "dynamic") if FLAGS[name].value]
    if len(chosen) > 1:
        raise UsageError(
            f"choose one of --int8, --int16x8, --float16 and --dynamic; got {' and '.join('--' + c for c in chosen)}."
        )
    if FLAGS.calibration and chosen and chosen[0] not in ("int8", "int16x8"):
        raise UsageError(f"--calibration is for --int8 and --int16x8; --{chosen[0]} needs no calibration data.")
    calibration = None
    if FLAGS.calibration:
        calibration, _ = load_arrays(FLAGS.calibration, "--calibration")
    model = load_keras_model(model_path)
    quantized = is_quantized(model)
    if quantized and calibration is not None:
        raise CommandError(
            f"--calibration is for float models; {model_path} is a QAT model, which converts without it."
        )
    mode = chosen[0] if chosen else None
    if mode is None and calibration is not None:
        mode = "int8"
    if mode in ("int8", "int16x8") and not quantized and calibration is None:
        scheme = ", scheme='int16x8'" if mode == "int16x8" else ""
        raise CommandError(
            f"--{mode} for the float model {model_path} needs calibration inputs: add --calibration=INPUTS.npy (a few "
            "hundred typical inputs, np.save('inputs.npy', x_train[:300])), or convert a QAT model "
            f"(kerasq.quantize_model(model{scheme})), which needs none."
        )
    if mode in ("float16", "dynamic") and quantized:
        raise CommandError(
            f"--{mode} is for float models; {model_path} is a QAT model, which converts to int8: drop --{mode}, or "
            f"convert the float model it was made from with --{mode}."
        )
    bar = Progress("calibrating")
    try:
        with warnings.catch_warnings(record=True) as caught, calibration_progress(bar.update):
            warnings.simplefilter("always")
            export_tflite(model, out_path, mode=mode, representative_data=calibration)
    except ValueError as error:  # e.g. a QAT model asked for the other activation width
        raise CommandError(f"{model_path}: {_as_flags(error)}") from None
    finally:
        bar.close()
    tflite = load_tflite(out_path)
    sixteen = any(t.dtype == "int16" and not t.is_constant for t in tflite.tensors)
    internal = resolve_mode(mode if not quantized else None, quantized=quantized,
                            has_data=calibration is not None, activation_bits=16 if sixteen else 8)
    integer = "fully integer" if tflite.is_fully_integer else "not fully integer"
    print(f"{out_path}: {mode_text(internal)}, {tflite.size_bytes:,} bytes, {len(tflite.ops)} ops, {integer}")
    for warning in caught:
        if "fully integer" in str(warning.message):  # export_tflite's own warning: ops left in float
            say(f"kerasq convert: warning: {' '.join(str(warning.message).split())}")
    if internal == "float":
        print(
            f"Wrote a float32 file: {os.path.basename(model_path)} is a float model and no calibration data was given. "
            f"For int8: kerasq convert {model_path} OUT.tflite --int8 --calibration=INPUTS.npy (post-training, "
            "INPUTS.npy: a few hundred typical inputs), or fine-tune kerasq.quantize_model(model) and convert that "
            "(QAT); --dynamic gives int8 weights without calibration."
        )
    return 0


@command(
    "verify",
    ["MODEL.keras", "FILE.tflite"],
    "check a .tflite file against its Keras model (parity report); exit 1 if it fails",
    """Runs the Keras model and the .tflite file (with LiteRT's default kernels) on the inputs x of
DATA.npz and prints kerasq.verify_tflite's parity report: argmax agreement and largest output
difference (in output steps for int8 outputs), against the floor set by TFLite's own kernel paths.
With labels y in DATA.npz it also prints both accuracies. Exit code 1 when the check fails.""",
    "kerasq verify model_qat.keras model_int8.tflite --data=test.npz   # np.savez('test.npz', x=x_test, y=y_test)",
    ["data"],
    usage="--data=DATA.npz",
    wrong_count="verify takes MODEL.keras and FILE.tflite; got {n} arguments.",
)
def verify(model_path, tflite_path):
    import numpy as np

    from kerasq.export import verify_tflite

    if not FLAGS.data:
        raise UsageError("verify needs --data=DATA.npz (inputs x, optionally labels y).")
    x, y = load_arrays(FLAGS.data, "--data")
    model = load_keras_model(model_path)
    tflite = load_tflite(tflite_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report says when the file is fragile
        report = verify_tflite(model, tflite, x)
    print(report)
    if y is not None:
        keras_logits = np.asarray(model.predict(x, batch_size=256, verbose=0))
        keras_accuracy = float(np.mean(keras_logits.argmax(-1) == np.asarray(y).reshape(keras_logits.shape[:-1])))
        print(f"Accuracy on y: Keras {100 * keras_accuracy:.2f}%, TFLite {100 * tflite.evaluate(x, y):.2f}%")
    if not report.passed:
        raise CommandError(f"{tflite_path} does not reproduce {model_path} within the floor (see the report above).")
    return 0


@command(
    "migrate",
    ["OLD.h5", "NEW.keras"],
    "rebuild a tf_keras (Keras 2) or tfmot model as a Keras 3 kerasq model",
    """Rebuilds a model saved by tf_keras (Keras 2: a .h5 file, a SavedModel directory or a tf_keras
.keras file), plain or wrapped by tfmot's quantize_model/prune_low_magnitude, as a Keras 3 kerasq
model and saves it as NEW.keras (never over OLD).""",
    "kerasq migrate tfmot_qat_model.h5 model_qat.keras && kerasq convert model_qat.keras model_int8.tflite",
    wrong_count="migrate takes OLD.h5 and NEW.keras; got {n} arguments.",
)
def migrate(old_path, new_path):
    from kerasq.pruning import pruning_layers
    from kerasq.quantization import is_quantized
    from kerasq.transfer import migrate_legacy

    if not new_path.endswith(".keras"):
        raise UsageError(f"migrate writes a .keras file; got {new_path}.")
    if os.path.abspath(old_path) == os.path.abspath(new_path):
        raise CommandError(f"NEW.keras must be another file than {old_path}: migrate never overwrites its source.")
    if not os.path.exists(old_path):
        raise CommandError(f"OLD.h5 {old_path}: no such file or directory.")
    try:
        model = migrate_legacy(old_path)
    except ValueError as error:  # the unmappable-layers list spans lines: one line here
        raise CommandError(" ".join(line.strip() for line in str(error).splitlines())) from error
    model.save(new_path)
    if is_quantized(model):
        kind = "kerasq QAT model (export it with kerasq convert)"
    elif pruning_layers(model):
        kind = "model with kerasq pruning wrappers"
    else:
        kind = "float model"
    print(f"{new_path}: {kind} migrated from {old_path}, {len(model.layers)} layers")
    return 0


def _as_flags(error):
    """`export_tflite`'s message with its `mode=` arguments written as this command's flags."""
    text = str(error)
    for mode in ("int16x8", "int8", "float16", "dynamic"):
        text = text.replace(f"mode='{mode}'", f"--{mode}")
    return text
