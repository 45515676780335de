"""One Markdown table of balpoe_tf's BalPoE runs and the official code's runs of compare.sh: balanced accuracy, ECE,
MCE and per-expert accuracy per seed, and the mean of each side.

    python benchmarks/official/summarize.py --ours=OUT/ours/reproduce.json --official=OUT/official \
        --output=OUT/comparison.md
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ours", required=True)
    parser.add_argument("--official", required=True)
    parser.add_argument("--output", required=True)
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
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
