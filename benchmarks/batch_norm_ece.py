"""How much of a finished mixup-trained run's test ECE comes from its batch-norm moving statistics?

Training updates every batch norm's moving mean and variance with momentum 0.9 on mixed batches,
so the statistics a model is evaluated with are weighted towards its last ten or so batches and
their mixup coefficients. From the run's final weights this measures the balanced test set
(accuracy, ECE, mean confidence minus accuracy):

- as trained;
- `--trials` times after `--refresh_batches` more mixup batches in training mode (statistics
  only, weights unchanged), each trial from the final statistics with its own mixup draws: the
  spread of ECE that the last batches alone cause;
- with the statistics replaced by their average over `--average_batches` mixup batches (what the
  moving average estimates, without its dependence on the last draws), and over as many batches
  without mixup.

    python benchmarks/batch_norm_ece.py --run_dir=RUN [--official_step=STEP.npz] --output=OUT.json

`--official_step` (official/official_step.py's output) evaluates the official code's weights
instead of RUN's model; RUN still gives the data and settings.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import balpoe_tf  # noqa: E402,F401  (TensorFlow defaults first)
import tensorflow as tf  # noqa: E402

from balpoe_tf import evaluation, models, run_config, run_folder  # noqa: E402
from balpoe_tf.data import pipelines  # noqa: E402
from balpoe_tf.training import mix, mixup_draw  # noqa: E402

DATA_SEED, FIRST_EPOCH = 7, 300  # training batches the run never saw in this order


def batch_norm_layers(model):
    return [layer for layer in model._flatten_layers() if hasattr(layer, "moving_mean")]


def statistics(model):
    return [(b.moving_mean.numpy(), b.moving_variance.numpy()) for b in batch_norm_layers(model)]


def set_statistics(model, values):
    for b, (mean, variance) in zip(batch_norm_layers(model), values):
        b.moving_mean.assign(mean)
        b.moving_variance.assign(variance)


def run_mixed(model, batches, alpha, seed):
    """Run `batches` through `model` in training mode, each mixed with its own mixup draw
    seeded `(seed, i)`: the moving statistics move as in training, the weights do not. Yields
    each batch's mixup coefficient after its step."""
    @tf.function
    def step(images, xi, perm):
        model(mix(images, xi, perm), training=True)

    for i, (images, _) in enumerate(batches):
        xi, perm = mixup_draw(alpha, tf.shape(images)[0], tf.constant([seed, i], tf.int64))
        step(images, xi, perm)
        yield float(xi)


def refresh(model, batches, alpha, seed):
    """`run_mixed` over all `batches`; returns the mixup coefficients."""
    return list(run_mixed(model, batches, alpha, seed))


def average_statistics(model, batches, alpha, seed):
    """Set every batch norm's moving mean and variance to their average over `batches`
    (mixed as in `refresh`; alpha 0: unmixed)."""
    layers = batch_norm_layers(model)
    momenta = [b.momentum for b in layers]
    for b in layers:
        b.momentum = 0.0  # each step leaves the batch's own statistics, which are summed here
    sums, n = None, 0
    for _ in run_mixed(model, batches, alpha, seed):
        values = statistics(model)
        sums = values if sums is None else [(m + vm, v + vv) for (m, v), (vm, vv) in zip(sums, values)]
        n += 1
    for b, momentum in zip(layers, momenta):
        b.momentum = momentum
    set_statistics(model, [(m / n, v / n) for m, v in sums])


def calibration(model, test_batches, train_counts):
    """Balanced test accuracy, ECE and mean confidence minus accuracy, in percent."""
    labels, logits, _ = models.predict_dataset(model, test_batches)
    m = evaluation.set_metrics(labels, logits, train_counts)
    return {"accuracy": round(100 * m["accuracy"], 2), "ece": round(100 * m["ece"], 2),
            "confidence_minus_accuracy": round(100 * m["overconfidence"], 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="a finished run (its config.json and model.keras)")
    parser.add_argument("--official_step", default="", help="official_step.py's .npz: use its weights")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--refresh_batches", type=int, default=20)
    parser.add_argument("--average_batches", type=int, default=200)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    model, record = run_folder.load_run(args.run_dir)
    config = run_config.RunConfig(**record["config"])
    data = run_config.load_data(config)
    counts = data.train_counts()
    if args.official_step:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "official"))
        from check_equivalence import load_official
        model, _ = load_official(np.load(args.official_step), len(counts))
    test = list(pipelines.test_pipeline(data, 500))
    train = iter(pipelines.train_pipeline(data, config.batch_size, FIRST_EPOCH + 100, DATA_SEED,
                                          config.augment, FIRST_EPOCH))
    alpha, final = config.mixup_alpha, statistics(model)

    def take(n):
        return [next(train) for _ in range(n)]

    result = {"run_dir": args.run_dir, "official_step": args.official_step,
              "final": calibration(model, test, counts), "trials": []}
    print("final", result["final"], flush=True)
    for t in range(args.trials):
        set_statistics(model, final)
        xis = refresh(model, take(args.refresh_batches), alpha, 1000 + t)
        trial = {**calibration(model, test, counts), "last_10_xi": [round(x, 3) for x in xis[-10:]]}
        result["trials"].append(trial)
        print("trial", t, trial, flush=True)
    for name, mixup in (("mixup_average", alpha), ("unmixed_average", 0.0)):
        set_statistics(model, final)
        average_statistics(model, take(args.average_batches), mixup, 5000)
        result[name] = calibration(model, test, counts)
        print(name, result[name], flush=True)
    eces = [t["ece"] for t in result["trials"]]
    result["trial_ece_range"] = [min(eces), max(eces)]
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
