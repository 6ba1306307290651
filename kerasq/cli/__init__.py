"""kerasq: quantization-aware training and verified int8 TFLite export for Keras 3.

Usage: kerasq COMMAND [ARGUMENTS] [FLAGS]

Commands:
{commands}

kerasq help COMMAND (or kerasq COMMAND --help) shows a command's flags and an example.
Flags may come before or after the command. Global flags: --quiet (no progress bars), --verbose
(TensorFlow's and LiteRT's own logging, tracebacks), --version.
Exit codes: 0 success, 1 error or failed check, 2 usage error.
"""

import os
import re
import sys

from absl import app, flags

# The subcommand modules import no TensorFlow at import time; they register their flags and commands.
from kerasq.cli import demo as _demo, files as _files, models as _models  # noqa: F401
from kerasq.cli.common import COMMANDS, FLAGS, CommandError, UsageError, set_terminal
from kerasq_command import silence_tensorflow, wants_logging

USAGE_ERROR = 2
_GLOBAL_FLAGS = ("quiet", "verbose", "version")
_HELP_FLAGS = {"-h", "-?", "--help", "--helpshort"}


def usage():
    """The global usage text: every command with its operands and what it does."""
    lines = []
    for c in COMMANDS.values():
        lines.append(f"  {c.usage_line()}")
        lines.append(f"      {c.summary}")
    lines.append("  kerasq help [COMMAND]")
    return __doc__.format(commands="\n".join(lines)).strip()


def command_help(name):
    """`kerasq help NAME`: the command's usage, description, flags and example."""
    c = COMMANDS[name]
    lines = [f"Usage: {c.usage_line()}", "", c.summary[0].upper() + c.summary[1:] + ".", "", c.description, ""]
    if c.flags:
        lines.append("Flags:")
        for flag_name in c.flags:
            flag = FLAGS[flag_name]
            value = "" if flag.boolean else f"={flag.default if flag.default is not None else '...'}"
            text = re.sub(r"^<[^>]*>: ", "", flag.help).split(": ", 1)[-1]
            lines.append(f"  --{flag_name}{value}\n      {text}")
        lines.append("")
    lines.append("Global flags: --quiet (no progress bars), --verbose (TensorFlow's logging, tracebacks).")
    lines.append("")
    lines.append("Example:")
    lines.extend(f"  {line}" for line in c.example.splitlines())
    return "\n".join(lines)


def version_text():
    from importlib import metadata

    import kerasq

    parts = []
    for package in ("keras", "tensorflow", "ai-edge-litert"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} not installed")
    return f"kerasq {kerasq.__version__} ({', '.join(parts)})"


def main(argv):
    """Runs the command in `argv` (`["kerasq", command, operands...]`, flags already parsed by absl)
    and returns the exit code: 0, 1 for an error in the command or a failed check, 2 for a usage error.

    Example:
    >>> from kerasq import cli
    >>> cli.main(["kerasq", "frobnicate"])  # prints the error and the usage to stderr
    2
    """
    if not FLAGS.is_parsed():  # called from Python, not through run(): flags at their defaults
        FLAGS.mark_as_parsed()
    args = list(argv[1:])
    if FLAGS.version:
        print(version_text())
        return 0
    if not args:
        return _usage_error("no command given.")
    name, operands = args[0], args[1:]
    if name == "help":
        return _help(operands)
    if name not in COMMANDS:
        return _usage_error(f"unknown command '{name}'.")
    c = COMMANDS[name]
    stray = [f for n in COMMANDS.values() for f in n.flags if f not in c.flags and FLAGS[f].present]
    if stray:
        return _usage_error(f"{name} does not take --{stray[0]}.", name)
    if len(operands) != len(c.operands):
        return _usage_error(c.wrong_count.format(name=name, n=len(operands)), name)
    return _run(c, operands)


def _help(operands):
    if not operands:
        print(usage())
        return 0
    if len(operands) > 1 or operands[0] not in COMMANDS:
        return _usage_error(f"help takes one command name ({', '.join(COMMANDS)}); got {' '.join(operands)}.")
    print(command_help(operands[0]))
    return 0


def _run(c, operands):
    """Runs command `c`, its C++ logging sent to a log unless --verbose; one-line errors."""
    from kerasq.export.errors import ExportError
    from kerasq.export.quiet import quiet

    stderr = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1) if _has_fd(sys.stderr) else sys.stderr
    set_terminal(stderr)
    try:
        if FLAGS.verbose:
            return c.function(*operands)
        with quiet():  # C++ code (the converter, LiteRT's delegates) writes to file descriptor 2
            return c.function(*operands)
    except UsageError as error:
        return _usage_error(str(error), c.name)
    except (CommandError, ExportError, FileNotFoundError, ValueError, OSError, NotImplementedError) as error:
        if FLAGS.verbose:
            raise
        print(f"kerasq {c.name}: error: {' '.join(str(error).split())}", file=stderr)
        return 1
    except Exception as error:  # a bug, or a case the command does not know: one line, the traceback on demand
        if FLAGS.verbose:
            raise
        text = " ".join(str(error).split())[:400]
        print(f"kerasq {c.name}: error: {type(error).__name__}: {text} (--verbose shows the traceback)", file=stderr)
        return 1
    finally:
        set_terminal(None)
        if stderr is not sys.stderr:
            stderr.close()


def _has_fd(stream):
    try:
        stream.fileno()
        return True
    except (AttributeError, ValueError, OSError):
        return False


def _usage_error(message, name=None):
    where = f"kerasq {name}" if name else "kerasq"
    text = f"Usage: {COMMANDS[name].usage_line()}\nRun 'kerasq help {name}' for its flags and an example." if name else usage()
    print(f"{where}: {message}\n\n{text}", file=sys.stderr)
    return USAGE_ERROR


def _parse_flags(argv):
    """absl's flag parsing, with a usage error (exit code 2) for a bad flag instead of exit code 1."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        print(f"kerasq: {error}\nRun 'kerasq help' for the commands and their flags.", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def run(argv=None):
    """The `kerasq` command: the console script (`kerasq_command.run`) and `python -m kerasq`."""
    arguments = list(sys.argv if argv is None else argv)
    options = [a for a in arguments[1:] if a.startswith("-")]
    if not wants_logging(arguments):
        silence_tensorflow()  # what it can still silence: the console script did it before any import
    if _HELP_FLAGS & set(options):  # each command's own help, not absl's list of every flag
        names = [a for a in arguments[1:] if not a.startswith("-")]
        if names and names[0] == "help":
            names = names[1:]
        if names and names[0] not in COMMANDS:
            raise SystemExit(_usage_error(f"unknown command '{names[0]}'."))
        print(command_help(names[0]) if names else usage())
        raise SystemExit(0)
    # absl's --helpfull prints the __main__ module's docstring and the flags of the program file (argv[0]).
    main_module = sys.modules.get("__main__")
    if main_module is not None and getattr(main_module, "__doc__", None) != usage():
        main_module.__doc__ = usage()
    for c in COMMANDS.values():
        for name in c.flags + _GLOBAL_FLAGS:
            FLAGS.register_key_flag_for_module(arguments[0], FLAGS[name])
    try:
        app.run(main, argv=arguments, flags_parser=_parse_flags)
    except SystemExit as exit:
        if exit.code == 1 and "--helpfull" in options:  # absl exits with 1 after printing help
            raise SystemExit(0) from None
        raise


if __name__ == "__main__":
    run()
