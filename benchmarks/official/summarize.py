"""One Markdown table of balpoe_tf's BalPoE runs and the official code's runs of compare.sh: balanced accuracy, ECE,
MCE and per-expert accuracy per seed, and the mean of each side.

    python benchmarks/official/summarize.py --ours=OUT/ours/reproduce.json --official=OUT/official \
        --output=OUT/comparison.md

With --curve, a second table follows: accuracy and ECE along the schedule, ours from the validation
TensorBoard log of the first BalPoE run (every --eval_every epochs), the official code's from every result
JSON under --official, its subfolders included (train_official.py's evaluations of kept states, whatever
epoch each holds).
"""

import argparse
import glob
import json
import os

import numpy as np


def rows(ours_path, official_dir):
    with open(ours_path) as f:
        ours = json.load(f)["runs"]
    for run in ours:
        if run["finished"] and run["method"] == "balpoe":
            experts = run["details"]["experts"]
            yield ("balpoe_tf", run["seed"], run["results"]["uniform"]["none"]["accuracy"],
                   run["results"]["uniform"]["none"]["ece"], run["results"]["uniform"]["none"]["mce"],
                   [v["accuracy"] for k, v in experts.items() if k != "ensemble"])
    for path in sorted(glob.glob(os.path.join(official_dir, "seed*.json"))):
        with open(path) as f:
            r = json.load(f)
        yield "official", r["seed"], r["accuracy"], r["ece"], r["mce"], r["expert_accuracy"]


def our_curve(ours_path):
    """{epoch: (accuracy, ece)} from the validation log of the first BalPoE run in reproduce.json."""
    import tensorflow as tf  # only here: the table above needs no TensorFlow

    with open(ours_path) as f:
        run = next(r for r in json.load(f)["runs"] if r["method"] == "balpoe")
    values = {}
    for path in sorted(glob.glob(os.path.join(run["run_dir"], "tensorboard", "validation", "*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.tag in ("epoch_accuracy", "epoch_ece"):  # Keras logs epoch e (1-based) at step e - 1
                    values.setdefault(event.step + 1, {})[v.tag] = float(tf.make_ndarray(v.tensor))
    return {e: (v["epoch_accuracy"], v["epoch_ece"]) for e, v in values.items() if len(v) == 2}


def official_curve(official_dir):
    """{epoch: (accuracy, ece)} from train_official.py's result JSONs under official_dir."""
    values = {}
    for path in glob.glob(os.path.join(official_dir, "**", "*.json"), recursive=True):
        with open(path) as f:
            r = json.load(f)
        if isinstance(r, dict) and {"epochs", "accuracy", "ece"} <= r.keys():  # other JSON files are not results
            values[r["epochs"]] = (r["accuracy"], r["ece"])
    return values


def curve_table(ours, official):
    lines = ["| epoch | balpoe_tf accuracy | official accuracy | difference | balpoe_tf ECE | official ECE |",
             "|---|---|---|---|---|---|"]
    for epoch in sorted(set(ours) & set(official)):
        (a, e), (b, f) = ours[epoch], official[epoch]
        lines.append(f"| {epoch} | {100 * a:.1f} | {100 * b:.1f} | {100 * (a - b):+.1f} | "
                     f"{100 * e:.1f} | {100 * f:.1f} |")
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ours", required=True)
    parser.add_argument("--official", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--curve", action="store_true", help="add accuracy and ECE along the schedule")
    args = parser.parse_args()
    table = list(rows(args.ours, args.official))
    lines = ["| side | seed | accuracy | ECE | MCE | experts (lambda 1, 0, -1) |", "|---|---|---|---|---|---|"]
    for side, seed, acc, ece, mce, experts in table:
        lines.append(f"| {side} | {seed} | {100 * acc:.1f} | {100 * ece:.1f} | {100 * mce:.1f} | "
                     + " / ".join(f"{100 * e:.1f}" for e in experts) + " |")
    for side in ("balpoe_tf", "official"):
        values = np.array([r[2:5] for r in table if r[0] == side]) * 100
        if len(values):
            spread = values[:, 0].max() - values[:, 0].min()
            lines.append(f"| {side} mean | {len(values)} seeds | {values[:, 0].mean():.1f} (spread {spread:.1f}) | "
                         f"{values[:, 1].mean():.1f} | {values[:, 2].mean():.1f} | |")
    if args.curve:
        lines += [""] + curve_table(our_curve(args.ours), official_curve(args.official))
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
