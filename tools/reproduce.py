"""Reproduce the paper's comparisons on a real long-tailed dataset that installs here:
Fashion-MNIST (Debian package dataset-fashion-mnist) made long-tailed.

    python tools/reproduce.py [--imbalance_ratios=100,10] [--seeds=1,2,3] [--epochs=12]

For each imbalance ratio and seed it trains cross-entropy, balanced softmax (lambda 0),
BalPoE without mixup, BalPoE with mixup (lambdas 1, 0, -1) and the uniform ensemble with
one short schedule (a run folder that exists is resumed, so an interrupted reproduction
continues), evaluates each on the balanced and shifted test sets with and without the
known prior, and writes per-ratio tables plus a summary (mean over seeds, and whether the
paper's orderings hold) as Markdown and JSON under --output_dir.
"""

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import balpoe_tf  # noqa: E402,F401  (TensorFlow defaults before TF loads)
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from balpoe_tf import evaluation, experiment  # noqa: E402

flags.DEFINE_string("data_path", "/usr/share/datasets/fashion-mnist", "IDX folder of Fashion-MNIST.")
flags.DEFINE_list("imbalance_ratios", ["100", "10"], "Imbalance ratios.")
flags.DEFINE_list("seeds", ["1"], "Run seeds.")
flags.DEFINE_integer("epochs", 12, "Epochs of the short schedule (LR x0.1 at 80% and 90%).")
flags.DEFINE_string("backbone", "resnet8", "Backbone (CIFAR-style ResNet on 28x28 inputs).")
flags.DEFINE_string("output_dir", "runs/reproduce", "Where runs and reports go.")
FLAGS = flags.FLAGS

# Method -> overrides of the BalPoE base config (lambdas 1, 0, -1 with mixup).
METHODS = {
    "CE": experiment.BASELINES["ce"],
    "BS (lambda 0)": experiment.BASELINES["bs"],
    "BalPoE, no mixup": experiment.BASELINES["erm"],
    "BalPoE": {},
    "uniform ensemble": dict(lambdas=[0.0, 0.0, 0.0]),
}
SUMMARY_METRICS = ("accuracy", "many_accuracy", "medium_accuracy", "few_accuracy", "ece", "mce")


def base_config(ratio: float, seed: int, output_dir: str) -> experiment.RunConfig:
    epochs = FLAGS.epochs
    return experiment.RunConfig(
        output_dir=output_dir, dataset="idx", data_path=FLAGS.data_path, imbalance_ratio=ratio,
        augment="crop_flip", backbone=FLAGS.backbone, num_experts=3, lambdas=[1.0, 0.0, -1.0],
        mixup_alpha=0.4, epochs=epochs, batch_size=128, lr=0.1, schedule="step", warmup_epochs=1,
        milestones=[int(0.8 * epochs), int(0.9 * epochs)], seed=seed, eval_every=epochs,
        checkpoint_every=1, export=False)


def _slug(name):
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def orderings(summary: dict) -> list:
    """Plain statements of whether the paper's orderings hold in `summary`."""
    acc = {m: summary[m]["accuracy"] for m in summary}
    checks = [
        ("BalPoE > BS > CE in balanced accuracy", acc["BalPoE"] > acc["BS (lambda 0)"] > acc["CE"]),
        ("mixup lowers BalPoE's ECE", summary["BalPoE"]["ece"] < summary["BalPoE, no mixup"]["ece"]),
        ("BalPoE > uniform ensemble in balanced accuracy", acc["BalPoE"] > acc["uniform ensemble"]),
    ]
    return [f"- {text}: {'holds' if ok else 'does not hold'}" for text, ok in checks]


def _mean(values):
    # A group with no class (e.g. no few-shot class at IR 10) stays NaN without a warning.
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def main(argv):
    del argv
    report, everything = [], {}
    for ratio in (float(r) for r in FLAGS.imbalance_ratios):
        per_seed = {}
        for seed in (int(s) for s in FLAGS.seeds):
            runs = []
            for method, overrides in METHODS.items():
                out = os.path.join(FLAGS.output_dir, f"ir{ratio:g}", f"seed{seed}", _slug(method))
                config = dataclasses.replace(base_config(ratio, seed, out), **overrides)
                print(f"=== IR {ratio:g}, seed {seed}: {method} -> {out}", flush=True)
                experiment.train(config)
                runs.append(out)
            results = evaluation.evaluate_runs(evaluation.EvalConfig(
                run_dir=",".join(runs), priors="none,known",
                output_dir=os.path.join(FLAGS.output_dir, f"ir{ratio:g}", f"seed{seed}", "evaluation")),
                log=lambda line: None)
            per_seed[seed] = {method: results[os.path.basename(run)] for method, run in zip(METHODS, runs)}
        summary = {
            method: {k: _mean([per_seed[s][method]["uniform"]["none"][k] for s in per_seed])
                     for k in SUMMARY_METRICS}
            for method in METHODS}
        everything[f"ir{ratio:g}"] = {"summary": summary, "per_seed": per_seed}
        report += [f"## Fashion-MNIST-LT, IR {ratio:g} ({len(per_seed)} seed(s), {FLAGS.epochs} epochs)", "",
                   "Balanced test set, mean over seeds (%).", "",
                   "| method | accuracy | many | medium | few | ECE | MCE |", "|---|---|---|---|---|---|---|"]
        report += [f"| {m} | " + " | ".join(experiment.percent(v[k]) for k in SUMMARY_METRICS) + " |"
                   for m, v in summary.items()]
        report += ["", *orderings(summary), "",
                   f"Shifted test sets, with and without the known prior: see "
                   f"`ir{ratio:g}/seed*/evaluation/shifted_accuracy.md`.", ""]
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "reproduce.json"), "w") as f:
        json.dump(everything, f, indent=1, default=lambda o: None)
    with open(os.path.join(FLAGS.output_dir, "reproduce.md"), "w") as f:
        f.write("\n".join(report))
    print("\n".join(report))
    print(f"wrote {FLAGS.output_dir}/reproduce.md and reproduce.json")


if __name__ == "__main__":
    app.run(main)
