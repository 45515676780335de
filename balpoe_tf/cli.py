"""absl flags from config dataclasses, and error reporting for the command-line tools."""

import dataclasses
import sys
import typing

from absl import flags
from absl import logging as absl_logging

from balpoe_tf.data import DataError

FLAGS = flags.FLAGS


def config_field(default, help_text):
    """A config dataclass field with the help text of its flag."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help_text})
    return dataclasses.field(default=default, metadata={"help": help_text})


def define_flags(config_class, flag_values=FLAGS):
    """Define one absl flag per field of a config dataclass, with its default and help."""
    for field in dataclasses.fields(config_class):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata.get("help", field.name)
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
    """The config dataclass filled from the parsed flags."""
    values = {}
    for field in dataclasses.fields(config_class):
        value = flag_values[field.name].value
        if typing.get_origin(field.type) is list or str(field.type).startswith(("List", "list")):
            (item,) = typing.get_args(field.type)
            try:
                value = [item(v) for v in value if str(v).strip()]
            except ValueError:
                sys.exit(f"error: --{field.name}={','.join(value)} must be a comma-separated list of "
                         f"{item.__name__} values")
        values[field.name] = value
    return config_class(**values)


def _reject_positional(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected argument(s) {argv[1:]}: every setting is a --flag "
                 "(see --helpfull)")


def _run_reporting_errors(fn):
    """Run `fn`; report bad input (data, run folder, values) as one clear line and exit 2."""
    from balpoe_tf.experiment import RunError

    try:
        fn()
    except (DataError, RunError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run_tool(config_class, fn):
    """Define one flag per field of `config_class`; return the `main` for `absl.app.run`,
    which fills the config from the flags and runs `fn(config)`, reporting bad input as
    one line (exit 2)."""
    define_flags(config_class)

    def main(argv):
        _reject_positional(argv)
        if not FLAGS["verbosity"].present:
            # TensorFlow's INFO lines (SavedModel assets, tf.data) would bury the progress lines.
            absl_logging.set_verbosity(absl_logging.WARNING)
        config = config_from_flags(config_class)
        return _run_reporting_errors(lambda: fn(config))

    return main
