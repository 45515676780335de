"""Reproduce the paper's comparisons on a real long-tailed dataset that installs here:
Fashion-MNIST (Debian package dataset-fashion-mnist) made long-tailed.

    python tools/reproduce.py [--imbalance_ratios=100,10] [--seeds=1,2,3] [--epochs=8]

The defaults (both ratios, one seed, 8 epochs) take about 25 minutes on 2 CPU cores
(IR 10 about 15, measured; IR 100, with 60 % of the images, about 10).

For each imbalance ratio and seed it trains cross-entropy, balanced softmax (lambda 0),
BalPoE without mixup, BalPoE with mixup (lambdas 1, 0, -1) and the uniform ensemble with
one short schedule (a run folder that exists is resumed, so an interrupted reproduction
continues), evaluates each on the balanced and shifted test sets with and without the
known prior, and writes per imbalance ratio a report in the paper's table layout (mean and
standard deviation over seeds, and whether the paper's orderings hold in each seed) as
Markdown and JSON: --output_dir/reproduce_ir<ratio>.{md,json}.
"""

import dataclasses
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
flags.DEFINE_integer("epochs", 8, "Epochs of the short schedule (LR x0.1 at 80% and 90%).")
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
SUMMARY_METRICS = ("accuracy", "many_accuracy", "medium_accuracy", "few_accuracy", "ece", "mce",
                   "overconfidence")


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


def orderings(per_seed: dict) -> list:
    """Plain statements of whether the paper's orderings hold, seed by seed."""
    checks = {
        "BalPoE > BS > CE in balanced accuracy":
            lambda r: r["BalPoE"]["accuracy"] > r["BS (lambda 0)"]["accuracy"] > r["CE"]["accuracy"],
        "BalPoE without mixup > BS > CE in balanced accuracy":
            lambda r: r["BalPoE, no mixup"]["accuracy"] > r["BS (lambda 0)"]["accuracy"] > r["CE"]["accuracy"],
        "mixup lowers BalPoE's ECE": lambda r: r["BalPoE"]["ece"] < r["BalPoE, no mixup"]["ece"],
        "BalPoE > uniform ensemble in balanced accuracy":
            lambda r: r["BalPoE"]["accuracy"] > r["uniform ensemble"]["accuracy"],
    }
    lines = []
    for text, holds in checks.items():
        count = sum(holds({m: run["uniform"]["none"] for m, run in results.items()})
                    for results in per_seed.values())
        verdict = "holds" if count == len(per_seed) else "does not hold" if count == 0 else "mixed"
        lines.append(f"- {text}: {verdict} (in {count} of {len(per_seed)} seeds)")
    return lines


def _cell(mean, std):
    cell = experiment.percent(mean)
    return cell if np.isnan(std) else f"{cell} ± {100 * std:.1f}"


def ratio_report(ratio: float, per_seed: dict, mean: dict, std: dict) -> list:
    """Markdown lines: balanced test set (mean ± std over seeds), orderings, shifted test sets."""
    lines = [f"## Fashion-MNIST-LT, IR {ratio:g} ({len(per_seed)} seed(s), {FLAGS.epochs} epochs)", "",
             "Balanced test set (%, mean ± standard deviation over seeds; conf − acc is mean top-1 "
             "confidence minus accuracy, negative when the model is underconfident).", "",
             "| method | accuracy | many | medium | few | ECE | MCE | conf − acc |", "|" + "---|" * 8]
    for method in METHODS:
        m, s = mean[method]["uniform"]["none"], std[method]["uniform"]["none"]
        lines.append(f"| {method} | " + " | ".join(_cell(m[k], s[k]) for k in SUMMARY_METRICS) + " |")
    lines += ["", *orderings(per_seed), "",
              "Accuracy (%) on the shifted test sets, mean over seeds, without and with the known test prior.", ""]
    lines += evaluation.accuracy_markdown(evaluation.accuracy_header(mean), evaluation.accuracy_table(mean))
    return lines + [""]


def main(argv):
    del argv
    os.makedirs(FLAGS.output_dir, exist_ok=True)
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
        mean, std = evaluation.mean_over_seeds(list(per_seed.values()))
        report = ratio_report(ratio, per_seed, mean, std)
        path = os.path.join(FLAGS.output_dir, f"reproduce_ir{ratio:g}")
        experiment.write_json(path + ".json", {"epochs": FLAGS.epochs, "mean": mean, "std": std,
                                               "per_seed": per_seed})
        with open(path + ".md", "w") as f:
            f.write("\n".join(report))
        print("\n".join(report))
        print(f"wrote {path}.md and {path}.json")


if __name__ == "__main__":
    app.run(main)
