"""Settings as dataclasses whose fields carry their flag's help text and valid values.

A field made with `config_field(default, help, check)` becomes one absl flag of a tool
(`cli.define_flags`) and is checked whenever the dataclass is made (`validate`), so a bad
value is refused before any work, from the command line and from Python alike.
"""

import dataclasses
import math
import numbers
from typing import Callable, Optional, Sequence


class RunError(RuntimeError):
    """A run cannot start or be used as asked; the message says why and what to do."""


def error_line(error: BaseException, limit: Optional[int] = 200) -> str:
    """`error` in one line for a `RunError`: its type and the first line of its message (cut at
    `limit` characters), or "no details" when it has none."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:limit] if lines else 'no details'}"


class ConfigError(ValueError):
    """A setting has a value outside its valid range; the message names the flag, the
    value and what it may be."""


@dataclasses.dataclass(frozen=True)
class Check:
    """A rule for one setting: `ok(value)` says whether it holds, `rule` says it in words
    ("an integer >= 1"), as the error message shows it."""

    ok: Callable[[object], bool]
    rule: str
    choices: Optional[tuple] = None  # the allowed values, when they are a list


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low) -> Check:
    return Check(lambda v: _finite(v) and v >= low, f">= {low:g}")


def greater_than(low) -> Check:
    return Check(lambda v: _finite(v) and v > low, f"> {low:g}")


def between(low, high, open_high=False) -> Check:
    if open_high:
        return Check(lambda v: _finite(v) and low <= v < high, f"in [{low:g}, {high:g})")
    return Check(lambda v: _finite(v) and low <= v <= high, f"in [{low:g}, {high:g}]")


def one_of(choices: Sequence[str]) -> Check:
    choices = tuple(choices)
    return Check(lambda v: v in choices, "one of " + ", ".join(choices), choices)


def each(check: Check) -> Check:
    """Every item of a list follows `check` (an empty list passes)."""
    return Check(lambda values: all(check.ok(v) for v in values), f"a list of values each {check.rule}")


def either(value, check: Check, meaning: str) -> Check:
    """`value` itself (with its `meaning`), or anything `check` accepts."""
    return Check(lambda v: v == value or check.ok(v), f"{value:g} ({meaning}) or {check.rule}")


NON_EMPTY = Check(lambda v: bool(str(v).strip()), "a non-empty value")
FINITE = Check(_finite, "a finite number")


def config_field(default, help_text: str, check: Optional[Check] = None):
    """A config dataclass field with the help text of its flag and the rule its value follows."""
    metadata = {"help": help_text, "check": check}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_value(value) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, (list, tuple)):
        return ",".join(flag_value(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def problem(name: str, value, rule: str) -> str:
    """The error line for flag `name` holding `value` that breaks `rule`."""
    return f"--{name}={flag_value(value)}: must be {rule}"


def refuse(name: str, value, rule: str):
    """Raise the one-line error for flag `name` holding `value` that breaks `rule`."""
    raise ConfigError(problem(name, value, rule))


def _broken_fields(config) -> list:
    """`(field, value)` of each field of a config dataclass that breaks its rule."""
    return [(f, getattr(config, f.name)) for f in dataclasses.fields(config)
            if f.metadata.get("check") is not None and not f.metadata["check"].ok(getattr(config, f.name))]


def invalid_fields(config) -> set:
    """The names of the fields of a config dataclass that break their rule."""
    return {f.name for f, _ in _broken_fields(config)}


def validate(config, contradictions: Sequence[str] = (), fixes: Sequence[str] = ()):
    """Check every field of a config dataclass against its rule, and raise one `ConfigError`
    naming every field that breaks it and every contradiction between settings the caller
    found (`problem` lines), with the flags that mend them (`fixes`) ready to paste.

    One problem is one line; several are a count and one line each."""
    found = []
    for field, value in _broken_fields(config):
        rule = field.metadata["check"].rule
        if isinstance(value, float) and not math.isfinite(value) and "finite" not in rule:
            rule = f"a finite number {rule}" if rule.startswith((">", "<", "in ")) else f"a finite number, {rule}"
        found.append(problem(field.name, value, rule))
    found += list(contradictions)
    if len(found) == 1:
        raise ConfigError(found[0] + (f"; fix: {' '.join(fixes)}" if fixes else ""))
    if found:
        raise ConfigError(f"{len(found)} settings must change:\n  " + "\n  ".join(found)
                          + (f"\nfix: add {' '.join(fixes)}" if fixes else ""))
