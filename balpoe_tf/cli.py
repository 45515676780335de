"""absl flags from config dataclasses, and error reporting for the command-line tools."""

import dataclasses
import shlex
import signal
import sys
import textwrap
import typing
import warnings

from absl import app, flags
from absl import logging as absl_logging

from balpoe_tf.config import ConfigError, flag_value, refuse, RunError
from balpoe_tf.data import DataError
from balpoe_tf.preemption import exit_code, EXIT_WORKER_LOST, Interrupted, WorkerLost
from balpoe_tf.training import TrainingDiverged

FLAGS = flags.FLAGS

# Exit codes of the tools: bad settings or input (nothing was done), a run that diverged.
EXIT_BAD_INPUT, EXIT_DIVERGED = 2, 1


def define_flags(config_class, flag_values=FLAGS):
    """Define one absl flag per field of a config dataclass, with its default and help."""
    for field in dataclasses.fields(config_class):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata.get("help", field.name)
        check = field.metadata.get("check")
        if check is not None:
            help_text = f"{help_text} [{check.rule}]"
        if field.type in (bool, "bool"):
            flags.DEFINE_bool(field.name, default, help_text, flag_values=flag_values)
        elif field.type in (int, "int"):
            flags.DEFINE_integer(field.name, default, help_text, flag_values=flag_values)
        elif field.type in (float, "float"):
            flags.DEFINE_float(field.name, default, help_text, flag_values=flag_values)
        elif field.type in (str, "str"):
            flags.DEFINE_string(field.name, default, help_text, flag_values=flag_values)
        else:  # lists
            flags.DEFINE_list(field.name, [str(v) for v in default], help_text,
                              flag_values=flag_values)


def config_from_flags(config_class, flag_values=FLAGS):
    """The config dataclass filled from the parsed flags; a value that is not of the
    field's type or breaks its rule raises `ConfigError`."""
    values = {}
    for field in dataclasses.fields(config_class):
        value = flag_values[field.name].value
        if typing.get_origin(field.type) is list or str(field.type).startswith(("List", "list")):
            (item,) = typing.get_args(field.type)
            try:
                value = [item(v) for v in value if str(v).strip()]
            except ValueError:
                refuse(field.name, value, f"a comma-separated list of {item.__name__} values")
        values[field.name] = value
    return config_class(**values)


# What asks a tool for its own flags (absl's --helpfull lists absl's too).
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort")


def tool_help(config_classes, doc: str = "") -> str:
    """A tool's own flags for --help: `doc` (the tool's docstring), then each config class's
    fields in the groups of its `FLAG_GROUPS` ((title, first field) pairs), each flag with its
    default, its help and its rule."""
    lines = [doc.strip(), ""] if doc and doc.strip() else []
    for config_class in config_classes:
        fields = dataclasses.fields(config_class)
        groups = getattr(config_class, "FLAG_GROUPS", (("Flags", fields[0].name),))
        starts = {first: title for title, first in groups}
        for field in fields:
            if field.name in starts:
                lines += [f"{starts[field.name]}:"]
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            check = field.metadata.get("check")
            text = field.metadata.get("help", "") + (f" [{check.rule}]" if check is not None else "")
            lines.append(f"  --{field.name}={flag_value(default)}")
            lines += textwrap.wrap(text, 100, initial_indent="      ", subsequent_indent="      ")
        lines.append("")
    lines.append("Flags go on the command line or in a flag file (--flagfile=FILE, later flags win); "
                 "--helpfull also lists absl's own.")
    return "\n".join(lines)


def parse_flags(argv, flag_values=FLAGS):
    """absl's parsing, with a bad flag (unknown, mistyped, missing flag file) reported as
    one line and exit code 2 instead of absl's usage text."""
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if len(rest) > 1:
        print(f"error: unexpected argument(s) {rest[1:]}: every setting is a --flag (see --helpfull)",
              file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    return rest


def _one_line_warning(message, category, filename, lineno, line=None):
    # Python's default format prints the warning's source line under it.
    return f"warning: {message}\n"


def resume_command() -> str:
    """The command line this tool was started with, to run again."""
    return shlex.join(["python", *sys.argv])


def _run_reporting_errors(fn) -> int:
    """Run `fn`; report bad input (settings, data, run folder) as one clear line and
    return exit code 2, a diverged run as one line and exit code 1, a run stopped by a signal
    as one line with the command that resumes it and exit code 128 + the signal's number."""
    try:
        fn()
    except (TrainingDiverged, ConfigError, DataError, RunError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED if isinstance(e, TrainingDiverged) else EXIT_BAD_INPUT
    except Interrupted as e:
        print(f"{e}. The same command resumes it: {resume_command()}", file=sys.stderr)
        return exit_code(e.signum)
    except WorkerLost as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_WORKER_LOST
    except KeyboardInterrupt:  # a tool that saves nothing as it goes
        print("stopped by SIGINT (Ctrl-C)", file=sys.stderr)
        return exit_code(signal.SIGINT)
    return 0


def run_tool(config_classes, fn):
    """Run a tool: define one flag per field of each config class (one class or a tuple),
    parse and check them, fill the configs and call `fn(*configs)`; errors are one line and
    an exit code (see above)."""
    classes = config_classes if isinstance(config_classes, tuple) else (config_classes,)
    for config_class in classes:
        define_flags(config_class)

    def parse(argv):
        if any(a in HELP_FLAGS for a in argv[1:]):
            print(tool_help(classes, getattr(sys.modules["__main__"], "__doc__", "")))
            sys.exit(0)
        return parse_flags(argv)

    def main(argv):
        del argv  # parse_flags refused positional arguments
        # From here a KeyboardInterrupt is reported as one line (`_run_reporting_errors`), and a
        # training run watches the signal itself (`preemption.watching`).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        warnings.formatwarning = _one_line_warning
        if not FLAGS["verbosity"].present:
            # TensorFlow's INFO lines (SavedModel assets, tf.data) would bury the progress lines.
            absl_logging.set_verbosity(absl_logging.WARNING)
        return _run_reporting_errors(lambda: fn(*(config_from_flags(c) for c in classes)))

    app.run(main, flags_parser=parse)

