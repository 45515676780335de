"""Result tables, standard JSON files and reliability diagrams."""

import io
import json
import math
import os

import numpy as np

from balpoe_tf import precision


RESULT_COLUMNS = ("accuracy", "many_accuracy", "medium_accuracy", "few_accuracy", "ece", "mce", "nll")


def strict_json(value):
    """`value` with every NaN (e.g. the accuracy of an empty class group) as None, so that the
    JSON written is standard JSON (null) that any reader accepts, not Python's NaN extension."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_atomic(path: str, content):
    """Write `content` (str or bytes) to `path` so that a reader, or a run stopped in the middle,
    finds the old file or the new one, never a part."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    os.replace(tmp, path)


def write_json(path: str, value, **kwargs):
    """Write `value` to `path` as standard JSON (NaN as null), atomically; kwargs go to json.dump."""
    write_atomic(path, json.dumps(strict_json(value), indent=1, allow_nan=False, **kwargs))


def write_benchmark(path: str, result: dict, lines) -> str:
    """A benchmark's JSON at `path` and its Markdown `lines` beside it (`.md`), both printed
    or named, each naming the CPU it was measured on (speed is that CPU's); returns the
    Markdown's path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cpu = result.get("cpu") or precision.cpu_model()
    write_json(path, {"cpu": cpu, **result})
    markdown = os.path.splitext(path)[0] + ".md"
    with open(markdown, "w") as f:
        f.write("\n".join([f"CPU: {cpu}", "", *lines]) + "\n")
    print("\n".join(lines))
    print(f"wrote {path} and {markdown}")
    return markdown


def reliability_diagram_png(count, confidence, hits, title="") -> bytes:
    """A reliability diagram (accuracy and mean confidence per bin) as PNG bytes."""
    return reliability_panels_png([(title, (count, confidence, hits))])


def reliability_panels_png(panels) -> bytes:
    """Reliability diagrams side by side, one per `(title, (count, confidence, hits))`, as
    PNG bytes: the layout of the paper's Figures 7 and 8, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), dpi=80, squeeze=False)
    for ax, (title, bins) in zip(axes[0], panels):
        _draw_reliability(ax, *bins, title)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _draw_reliability(ax, count, confidence, hits, title):
    count, confidence, hits = (np.asarray(v, np.float64) for v in (count, confidence, hits))
    bins = len(count)
    edges = np.linspace(0, 1, bins + 1)
    nonempty = count > 0
    acc = np.where(nonempty, hits / np.maximum(count, 1), 0)
    conf = np.where(nonempty, confidence / np.maximum(count, 1), 0)
    ece = np.abs(hits - confidence).sum() / max(count.sum(), 1)
    mce = np.max(np.where(nonempty, np.abs(acc - conf), 0))
    ax.bar(edges[:-1], acc, width=1 / bins, align="edge", edgecolor="black", label="accuracy")
    ax.bar(edges[:-1], conf - acc, bottom=acc, width=1 / bins, align="edge", color="red",
           alpha=0.3, label="gap")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title="\n".join(filter(None, [title, f"ECE {100 * ece:.1f}  MCE {100 * mce:.1f}"])))
    ax.legend(loc="upper left")


def percent(value) -> str:
    """A fraction as a percentage with one decimal, or "n/a" for a missing (None / NaN) value."""
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def markdown_table(header, rows) -> list:
    """The lines of a Markdown table: the header, the rule, one line per row (cells as given, an
    empty one as `| |`): every table the package and its benchmarks write."""
    def line(cells):
        return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"

    return [line(header), "|" + "---|" * len(header)] + [line(row) for row in rows]


def format_table(rows: dict, columns=RESULT_COLUMNS) -> str:
    """A Markdown table of runs (rows) by metrics (columns, in %; NLL as is)."""
    def cell(column, value):
        return f"{value:.3f}" if column == "nll" and value is not None and not math.isnan(value) else percent(value)

    return "\n".join(markdown_table(["run"] + [c.replace("_accuracy", "") for c in columns],
                                     [[name] + [cell(c, metrics.get(c, float("nan"))) for c in columns]
                                      for name, metrics in rows.items()]))
