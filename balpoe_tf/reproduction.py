"""The paper's comparison as a set of resumable runs, and its report at any moment.

A reproduction is one BalPoE run configuration (a flag file, on any data source) and the
methods trained like it: BalPoE, balanced softmax (BS, lambda 0), BalPoE without mixup,
cross-entropy (CE) and the uniform ensemble, for one or more seeds, each in
`RUN_ROOT/seed<S>/<method>`. Training goes method by method and resumes from the last
checkpoint; the report covers what exists: finished runs with every metric (balanced and
shifted test sets, three test-time priors, experts, wall time), unfinished ones with the
epoch they reached.
"""

import dataclasses
import glob
import json
import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

import tensorflow as tf
from tensorboard.compat.proto import event_pb2

from balpoe_tf import evaluation, experiment, reporting, run_config, run_folder
from balpoe_tf.config import RunError
from balpoe_tf.names import METHODS, PRIOR_MODES
from balpoe_tf.settings import EvalConfig, ReproduceConfig
from balpoe_tf.precision import PrecisionChoice

# Balanced-test metrics of the summary, in percent except NLL.
SUMMARY_METRICS = reporting.RESULT_COLUMNS


def method_config(base: run_config.RunConfig, method: str, seed: int, run_root: str) -> run_config.RunConfig:
    """The config of `method` for `seed`: the BalPoE run `base` or one of its baselines."""
    if method not in METHODS:
        raise RunError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    baseline = METHODS[method][1]
    config = base if baseline is None else run_config.baseline_config(base, baseline)
    return dataclasses.replace(config, seed=seed, compare=[],
                               output_dir=os.path.join(run_root, f"seed{seed}", method))


def run_status(config: run_config.RunConfig) -> dict:
    """`{"finished": bool, "epoch": epochs done}` of a run folder."""
    finished = os.path.isfile(run_folder.RunFolder(config.output_dir).results)
    epoch = config.epochs if finished else run_folder.latest_checkpoint(config.output_dir)[0][0]
    return {"finished": finished, "epoch": epoch, "epochs": config.epochs}


def training_time(run_dir: str) -> dict:
    """Wall-clock seconds of training (with its periodic evaluations) and epochs trained,
    from the run's TensorBoard files: each process that trained writes its own file, whose
    first event is written when training starts and which gets one `epoch_loss` per epoch,
    so a resumed run's downtime is not counted."""
    seconds, epochs = 0.0, 0
    for path in glob.glob(os.path.join(run_folder.RunFolder(run_dir).tensorboard, "train", "events.*")):
        start, ends = None, []
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            if start is None:
                start = event.wall_time
            if any(v.tag == "epoch_loss" for v in event.summary.value):
                ends.append(event.wall_time)
        if ends:
            seconds += ends[-1] - start
            epochs += len(ends)
    return {"seconds": seconds, "epochs_timed": epochs}


def evaluate_run(run_dir: str, log: Callable[[str], None] = print) -> dict:
    """Results and details of `evaluation.evaluate_runs` for one finished run, kept in
    RUN/evaluation/evaluation.json and reused while it is newer than the model (and has the
    reliability bins, which older evaluations lack)."""
    folder = run_folder.RunFolder(run_dir)
    out, model = folder.evaluation, folder.model
    cached = os.path.join(out, evaluation.REPORT_FILES["json"])
    name = os.path.basename(os.path.normpath(run_dir))
    saved = None
    if os.path.isfile(cached) and os.path.getmtime(cached) > os.path.getmtime(model):
        with open(cached) as f:
            saved = json.load(f)
    if saved is None or "reliability" not in saved["details"][name]:
        evaluation.evaluate_runs(EvalConfig(run_dir=run_dir, priors=",".join(PRIOR_MODES), output_dir=out),
                                 log=lambda line: None)
        log(f"evaluated {run_dir}")
        with open(cached) as f:
            saved = json.load(f)
    return {"results": saved["results"][name], "details": saved["details"][name]}


def collect(base: run_config.RunConfig, methods: Sequence[str], seeds: Sequence[int], run_root: str,
            log: Callable[[str], None] = print) -> List[dict]:
    """One entry per (method, seed): status, and for finished runs the evaluation, the run
    record's commit and the training time."""
    entries = []
    for seed in seeds:
        for method in methods:
            config = method_config(base, method, seed, run_root)
            entry = {"method": method, "seed": seed, "run_dir": config.output_dir, **run_status(config)}
            if entry["finished"]:
                record = run_folder.read_record(config.output_dir)
                entry.update(evaluate_run(config.output_dir, log))
                entry["commit"] = record.versions.get("commit")
                entry["train_size"] = record.data.train_size
                entry["time"] = training_time(config.output_dir)
            entries.append(entry)
    return entries


def _pct(value) -> str:
    return reporting.percent(value)


def _balanced(entry: dict) -> dict:
    return entry["results"]["uniform"]["none"]


def summary_row(entry: dict) -> dict:
    """The benchmark record of one run: balanced-test metrics (percent; NLL as is), epochs,
    seed, commit and wall-clock hours; an unfinished run has its status only."""
    row = {"method": entry["method"], "seed": entry["seed"], "epochs": entry["epochs"],
           "finished": entry["finished"], "epochs_done": entry["epoch"]}
    if not entry["finished"]:
        return row
    metrics = _balanced(entry)
    for key in SUMMARY_METRICS:
        value = metrics[key]
        row[key.replace("_accuracy", "")] = (None if value is None or np.isnan(value)
                                             else round(value if key == "nll" else 100 * value, 2))
    time = entry["time"]
    row.update(commit=entry["commit"], wall_clock_hours=round(time["seconds"] / 3600, 4),
               images_per_s=round(entry["train_size"] * time["epochs_timed"] / max(time["seconds"], 1e-9), 1))
    return row


ORDERINGS = {
    "BalPoE > BS > CE in balanced accuracy": (("balpoe", "bs", "ce"),
                                              lambda r: r["balpoe"]["accuracy"] > r["bs"]["accuracy"]
                                              > r["ce"]["accuracy"]),
    "BalPoE without mixup > BS > CE in balanced accuracy": (
        ("balpoe_no_mixup", "bs", "ce"),
        lambda r: r["balpoe_no_mixup"]["accuracy"] > r["bs"]["accuracy"] > r["ce"]["accuracy"]),
    "mixup lowers BalPoE's ECE": (("balpoe", "balpoe_no_mixup"),
                                  lambda r: r["balpoe"]["ece"] < r["balpoe_no_mixup"]["ece"]),
    "BalPoE > uniform ensemble in balanced accuracy": (("balpoe", "uniform"),
                                                       lambda r: r["balpoe"]["accuracy"] > r["uniform"]["accuracy"]),
}


def orderings(entries: Sequence[dict]) -> List[str]:
    """Plain statements of whether the paper's orderings hold, over the seeds where every
    method they compare has finished."""
    by_seed: Dict[int, dict] = {}
    for e in entries:
        if e["finished"]:
            by_seed.setdefault(e["seed"], {})[e["method"]] = _balanced(e)
    lines = []
    for text, (needed, holds) in ORDERINGS.items():
        seeds = [r for r in by_seed.values() if all(m in r for m in needed)]
        if not seeds:
            continue
        count = sum(holds(r) for r in seeds)
        verdict = "holds" if count == len(seeds) else "does not hold" if count == 0 else "mixed"
        lines.append(f"- {text}: {verdict} (in {count} of {len(seeds)} seeds)")
    return lines


def report(entries: Sequence[dict], title: str) -> List[str]:
    """Markdown lines: status and balanced-test metrics of every run, mean ± std over the
    finished seeds, orderings, shifted test sets (mean over seeds, three priors) and the
    experts with the prior/KL diagnostic."""
    lines = [f"## {title}", "", "Balanced test set (%, NLL as is). Wall time is training with its periodic "
             "evaluations; images/s is training images x epochs / wall time.", ""]
    rows = []
    for e in entries:
        status = "finished" if e["finished"] else (f"unfinished: epoch {e['epoch']}/{e['epochs']}" if e["epoch"]
                                                   else "not started")
        cells = [METHODS[e["method"]][0], str(e["seed"]), status]
        if e["finished"]:
            row, m = summary_row(e), _balanced(e)
            cells += [_pct(m[k]) for k in SUMMARY_METRICS[:-1]] + [f"{m['nll']:.3f}", _pct(m["overconfidence"]),
                      f"{row['wall_clock_hours']:.2f}", f"{row['images_per_s']:.0f}", str(e["commit"])[:10]]
        else:
            cells += [""] * 11
        rows.append(cells)
    lines += reporting.markdown_table(["method", "seed", "status", "accuracy", "many", "medium", "few", "ECE", "MCE",
                                       "NLL", "conf − acc", "hours", "images/s", "commit"], rows)

    finished: Dict[str, list] = {}
    for e in entries:
        if e["finished"]:
            finished.setdefault(e["method"], []).append(e)
    if not finished:
        return lines + ["", "No run has finished yet."]
    if any(len(runs) > 1 for runs in finished.values()):
        rows = []
        for method, runs in finished.items():
            mean, std = evaluation.mean_over_seeds([_balanced(e) for e in runs])
            rows.append([METHODS[method][0], len(runs)] + [
                f"{_pct(mean[k])} ± {100 * std[k]:.1f}" if not np.isnan(std[k]) else _pct(mean[k])
                for k in SUMMARY_METRICS[:-1]])
        lines += ["", "Mean ± standard deviation over the finished seeds.", "",
                  *reporting.markdown_table(["method", "seeds", "accuracy", "many", "medium", "few", "ECE", "MCE"],
                                            rows)]
    lines += ["", *orderings(entries), "",
              "Accuracy (%) on the shifted test sets, mean over the finished seeds: no prior, the known test prior, "
              "and the prior estimated from the unlabeled test set (estimator in brackets).", ""]
    mean_results = {METHODS[m][0]: evaluation.mean_over_seeds([e["results"] for e in runs])[0]
                    for m, runs in finished.items()}
    lines += evaluation.accuracy_markdown(evaluation.accuracy_header(mean_results),
                                          evaluation.accuracy_table(mean_results))
    lines += ["", "Experts on the balanced test set (first finished seed): accuracy (%) and "
                  "KL(target prior pi^lambda || mean predicted distribution).", ""]
    lines += reporting.markdown_table(["method", "member", "lambda", "accuracy", "KL"], [
        [METHODS[method][0], member, f"{v['lambda']:g}", f"{100 * v['accuracy']:.1f}",
         f"{v['kl_target_to_marginal']:.4f}"]
        for method, runs in finished.items() for member, v in runs[0]["details"]["experts"].items()])
    return lines + ["", "Reliability diagrams on the balanced test set, first finished seed of each method: "
                        "reliability.png beside this report."]


def reliability_figure(entries: Sequence[dict]) -> Optional[bytes]:
    """The balanced-test reliability diagrams of the finished runs side by side (the paper's
    Figure 8), one panel per method from its first finished seed; None if none has finished."""
    panels, shown = [], set()
    for e in entries:
        if e["finished"] and e["method"] not in shown:
            shown.add(e["method"])
            bins = e["details"]["reliability"]
            panels.append((f"{METHODS[e['method']][0]}, seed {e['seed']}",
                           [bins[k] for k in evaluation.RELIABILITY_BINS]))
    return reporting.reliability_panels_png(panels) if panels else None


def merge_summary(previous: Optional[dict], summary: dict, path: str = "") -> dict:
    """`summary` laid over the `previous` one of the same title, row by (method, seed): a
    run's row replaces its earlier one unless that finished and this did not, so runs
    reported from another run root (or a machine since lost) stay reported; rows keep the
    earlier order, new ones go last."""
    if previous is None:
        return summary
    if previous.get("title") != summary["title"]:
        raise RunError(f"{path or 'the summary file'} holds the results of {previous.get('title')!r}, not of "
                       f"{summary['title']!r}: pass that --title to add to it, or another --summary_json")
    rows = {(r["method"], r["seed"]): r for r in previous["summary"]}
    for row in summary["summary"]:
        key = (row["method"], row["seed"])
        if row["finished"] or not rows.get(key, {}).get("finished"):
            rows[key] = row
    return {"title": summary["title"], "summary": list(rows.values())}


def write_report(entries: Sequence[dict], run_root: str, title: str, summary_json: str = "") -> Dict[str, str]:
    """RUN_ROOT/reproduce.md (the report), reproduce.json (`summary` rows for benchmarks,
    and every entry in full), once a run has finished reliability.png, and the title and
    summary rows to `summary_json` if given, merged into what it holds (`merge_summary`)."""
    summary = {"title": title, "summary": [summary_row(e) for e in entries]}
    previous = None
    if summary_json and os.path.isfile(summary_json):
        with open(summary_json) as f:
            previous = json.load(f)
    merged = merge_summary(previous, summary, summary_json)  # before writing anything: a wrong title stops here
    paths = {"markdown": os.path.join(run_root, "reproduce.md"), "json": os.path.join(run_root, "reproduce.json")}
    os.makedirs(run_root, exist_ok=True)
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(report(entries, title)) + "\n")
    reporting.write_json(paths["json"], {**summary, "runs": list(entries)})
    if summary_json:
        paths["summary"] = summary_json
        reporting.write_json(summary_json, merged)
    figure = reliability_figure(entries)
    if figure is not None:
        paths["figure"] = os.path.join(run_root, "reliability.png")
        with open(paths["figure"], "wb") as f:
            f.write(figure)
    return paths


def reproduce(base: run_config.RunConfig, config: ReproduceConfig, log: Callable[[str], None] = print) -> list:
    """Train every (seed, method) run that has not finished, one at a time (each resumes
    from its last checkpoint), then write and print the report; returns its entries."""
    run_folder.check_writable_folder(config.run_root, "run_root")
    if config.train:
        runs = [(method, seed, method_config(base, method, seed, config.run_root)) for seed in config.seeds
                for method in config.methods]
        # With --precision=auto every run of the comparison computes in the precision the first
        # one to start chose (a run that has started keeps its own).
        records = [run_folder.read_record(run.output_dir) for _, _, run in runs]
        started = [record.settings.precision for record in records if record]
        shared = next((p for p in started if p), None)
        for method, seed, run in runs:
            if run_status(run)["finished"]:
                continue
            log(f"=== {METHODS[method][0]}, seed {seed} -> {run.output_dir}")
            same = None if shared is None or run_folder.resumed_run_settings(run.output_dir) else \
                PrecisionChoice(shared, "compared")
            experiment.train(run, log, same)
            shared = shared or run_folder.read_record(run.output_dir).settings.precision
    entries = collect(base, config.methods, config.seeds, config.run_root, log)
    source = f"{base.dataset} {os.path.basename(os.path.normpath(base.data_path))}" if base.data_path else base.dataset
    title = config.title or f"{source}, IR {base.imbalance_ratio:g}, {base.epochs} epochs"
    paths = write_report(entries, config.run_root, title, config.summary_json)
    with open(paths["markdown"]) as f:
        log(f.read())
    log("report: " + ", ".join(paths.values()))
    return entries
