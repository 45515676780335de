"""Is balpoe_tf the official code's model and training step? From official_step.py's .npz:

1. the official weights loaded into `BalPoEModel` (3 experts, ResNet-32, scale 30): its expert
   logits on the balanced test set against the official model's (test images decoded by
   balpoe_tf), and the metrics of both;
2. from the same weights and momentum buffers, one `train_step` (`SGDWithL2` at the state's LR)
   on the same batch, mixup coefficient and permutation: the loss, and how far every updated
   weight and batch-norm statistic is from the official step's.

    python benchmarks/official/check_equivalence.py --step=STEP.npz --lists=LISTS [--output=CHECK.json]
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import balpoe_tf  # noqa: E402,F401  (TensorFlow defaults first)
import tensorflow as tf  # noqa: E402

import balpoe_tf.models.balpoe as balpoe_module  # noqa: E402
from balpoe_tf import data as lt_data, losses, metrics, task, training  # noqa: E402


def keras_order(keys, num_experts):
    """The official state-dict keys in the order of `BalPoEModel.weights`: trunk, then each
    expert's stage 2, stage 3 and classifier (PyTorch lists every expert's stage 2 first)."""
    order = [k for k in keys if k.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1."))]
    for e in range(num_experts):
        for part in ("layer2s", "layer3s", "linears"):
            order += [k for k in keys if k.startswith(f"backbone.{part}.{e}.")]
    return order


def to_keras(value):
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO


def load_official(step, num_classes, num_experts=3):
    """`BalPoEModel` with the official weights; also {weight path: official key}."""
    keys = [k[len("before/"):] for k in step.files if k.startswith("before/")]
    model = task.BalPoEModel(num_classes, num_experts=num_experts, backbone="resnet32", scale=30)
    model(np.zeros((1, 32, 32, 3), np.float32))
    order = keras_order(keys, num_experts)
    if len(order) != len(keys) or len(order) != len(model.weights):
        raise SystemExit(f"{len(keys)} official tensors, {len(model.weights)} balpoe_tf weights: not the same model")
    for weight, key in zip(model.weights, order):
        weight.assign(to_keras(step["before/" + key]))
    return model, {w.path: k for w, k in zip(model.weights, order)}


def test_images(lists):
    paths = lt_data.read_image_list(os.path.join(lists, "test.txt")).images
    return np.stack([lt_data.decode_pixels(tf.io.read_file(p), 3).numpy() for p in paths])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", required=True, help="official_step.py's output")
    parser.add_argument("--lists", required=True, help="the folder official_step.py read")
    parser.add_argument("--output", default="", help="also write the result as JSON")
    args = parser.parse_args()
    step = np.load(args.step)
    counts = step["counts"]
    normalize = lt_data.normalizer(lt_data.CIFAR_MEAN, lt_data.CIFAR_STD)
    model, key_of = load_official(step, len(counts))

    x = normalize(test_images(args.lists))
    ours = np.concatenate([model(x[b:b + 500], training=False)["expert_logits"].numpy()
                           for b in range(0, len(x), 500)])
    official = step["test_logits"]
    labels = step["test_labels"]
    result = {"test_logits_max_abs_difference": float(np.abs(ours - official).max()),
              "test_logits_max_abs": float(np.abs(official).max())}
    for side, logits in (("balpoe_tf", ours), ("official", official)):
        m = metrics.evaluate_logits(labels, logits.mean(1), counts, logits)
        result[side] = {k: round(100 * float(m[k]), 2) for k in ("accuracy", "ece", "mce", "expert0_accuracy",
                                                                  "expert1_accuracy", "expert2_accuracy")}

    lr, xi, perm = float(step["lr"]), float(step["xi"]), step["perm"].astype(np.int32)
    optimizer = training.SGDWithL2(learning_rate=lr, momentum=0.9, nesterov=True, l2=5e-4)
    model.compile(optimizer, losses.LogitAdjustedLoss(counts.astype(np.float64), lambdas=[1.0, 0.0, -1.0]),
                  mixup_alpha=1.0)
    optimizer.build(model.trainable_variables)
    for v in model.trainable_variables:
        optimizer.buffers[optimizer._get_variable_index(v)].assign(to_keras(step["buffer/" + key_of[v.path]]))
    balpoe_module.mixup_draw = lambda alpha, n, seed: (tf.constant(xi), tf.constant(perm))  # the official draw
    logs = model.train_step((normalize(step["train_images"]), tf.constant(step["train_labels"])))
    result["step_loss"] = {"balpoe_tf": float(logs["loss"]), "official": float(step["loss"])}
    # Each updated tensor against the official one, relative to how far the official step moved it.
    worst = {}
    for w in model.weights:
        key = key_of[w.path]
        before, after = to_keras(step["before/" + key]), to_keras(step["after/" + key])
        moved = max(float(np.abs(after - before).max()), 1e-12)
        kind = "batch-norm statistics" if "running" in key else "weights"
        worst[kind] = max(worst.get(kind, 0.0), float(np.abs(w.numpy() - after).max()) / moved)
    result["step_worst_difference_relative_to_the_step"] = worst
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
