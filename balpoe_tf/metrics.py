"""Long-tailed metrics: per-class and many/medium/few accuracy, calibration (ECE, MCE),
and per-expert accuracy, as streaming Keras metrics that also run under tf.distribute."""

import numpy as np

import keras
from keras import ops

from balpoe_tf.data.longtail import class_groups

NUM_CALIBRATION_BINS = 15


def _hits(y_true, y_pred):
    """1.0 where the top-1 prediction equals the label."""
    pred = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
    return ops.cast(pred == ops.cast(ops.reshape(y_true, (-1,)), "int32"), "float32")


@keras.saving.register_keras_serializable("balpoe_tf")
class GroupAccuracy(keras.metrics.Metric):
    """Top-1 accuracy over samples and per class, and the many / medium / few group
    accuracies (means of the per-class accuracies in each group; NaN for an empty group).

    Args:
        num_classes: number of classes C.
        train_counts: training images per class, which define the groups; may be set
            later through the `train_counts` attribute (no groups until then).
    """

    def __init__(self, num_classes, train_counts=None, name="group_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.train_counts = train_counts
        self.correct = self.add_variable(shape=(num_classes,), initializer="zeros", name="correct")
        self.total = self.add_variable(shape=(num_classes,), initializer="zeros", name="total")

    @property
    def train_counts(self):
        return self._train_counts

    @train_counts.setter
    def train_counts(self, counts):
        if counts is not None and len(counts) != self.num_classes:
            raise ValueError(f"{len(counts)} class counts for {self.num_classes} classes")
        self._train_counts = None if counts is None else [int(c) for c in counts]
        self._groups = {} if counts is None else {
            k: v.astype(np.float32) for k, v in class_groups(self._train_counts).items()}

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Args: y_true `(B,)` labels; y_pred `(B, C)` logits or probabilities."""
        onehot = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), self.num_classes)
        hit = _hits(y_true, y_pred)
        self.total.assign_add(ops.sum(onehot, axis=0))
        self.correct.assign_add(ops.sum(onehot * hit[:, None], axis=0))

    def per_class(self):
        return ops.where(self.total > 0, self.correct / ops.maximum(self.total, 1.0), np.nan)

    def result(self):
        acc = self.per_class()
        seen = ops.cast(self.total > 0, "float32")
        out = {"accuracy": ops.sum(self.correct) / ops.sum(self.total)}
        for group, mask in self._groups.items():
            sel = seen * mask
            out[f"{group}_accuracy"] = ops.sum(ops.where(sel > 0, acc, 0.0)) / ops.sum(sel)
        return out

    def get_config(self):
        return {"name": self.name, "num_classes": self.num_classes,
                "train_counts": self.train_counts}


@keras.saving.register_keras_serializable("balpoe_tf")
class CalibrationError(keras.metrics.Metric):
    """Expected and maximum calibration error of the top-1 softmax confidence.

    `num_bins` equal-width bins on [0, 1]; a sample is in bin b if
    lower_b < conf <= upper_b. ECE = sum_b n_b / N * |acc_b - conf_b|;
    MCE = max_b |acc_b - conf_b| over non-empty bins.

    Args:
        num_bins: number of bins (15, as the official code).
        from_logits: whether `y_pred` holds logits (softmax is applied) or probabilities.
    """

    def __init__(self, num_bins=NUM_CALIBRATION_BINS, from_logits=True, name="calibration", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_bins, self.from_logits = num_bins, from_logits
        self._inner_edges = np.linspace(0, 1, num_bins + 1, dtype=np.float32)[1:-1]
        self.count = self.add_variable(shape=(num_bins,), initializer="zeros", name="count")
        self.confidence = self.add_variable(shape=(num_bins,), initializer="zeros", name="confidence")
        self.hits = self.add_variable(shape=(num_bins,), initializer="zeros", name="hits")

    def update_state(self, y_true, y_pred, sample_weight=None):
        probs = ops.softmax(ops.cast(y_pred, "float32"), axis=-1) if self.from_logits else y_pred
        conf = ops.max(probs, axis=-1)
        hit = _hits(y_true, probs)
        bins = ops.sum(ops.cast(conf[:, None] > self._inner_edges[None, :], "int32"), axis=1)
        onehot = ops.one_hot(bins, self.num_bins)
        self.count.assign_add(ops.sum(onehot, axis=0))
        self.confidence.assign_add(ops.sum(onehot * conf[:, None], axis=0))
        self.hits.assign_add(ops.sum(onehot * hit[:, None], axis=0))

    def result(self):
        gap = ops.abs(self.hits - self.confidence)
        per_bin = ops.where(self.count > 0, gap / ops.maximum(self.count, 1.0), 0.0)
        return {"ece": ops.sum(gap) / ops.sum(self.count), "mce": ops.max(per_bin)}

    def get_config(self):
        return {"name": self.name, "num_bins": self.num_bins, "from_logits": self.from_logits}


def expert_accuracies(num_experts):
    """One accuracy metric per expert, named `expert{m}_accuracy`."""
    return [keras.metrics.SparseCategoricalAccuracy(name=f"expert{m}_accuracy")
            for m in range(num_experts)]


def evaluate_logits(labels, logits, train_counts, expert_logits=None,
                    num_bins=NUM_CALIBRATION_BINS) -> dict:
    """All the metrics of one set of predictions, as Python floats.

    Args:
        labels: `(N,)` labels.
        logits: `(N, C)` ensemble logits.
        train_counts: training images per class (for the groups).
        expert_logits: optional `(N, M, C)` per-expert logits.
        num_bins: calibration bins.

    Returns:
        accuracy, many/medium/few_accuracy, ece, mce, nll and expert{m}_accuracy.
    """
    labels = np.asarray(labels)
    logits = np.asarray(logits, np.float32)
    groups = GroupAccuracy(len(train_counts), train_counts)
    calibration = CalibrationError(num_bins)
    groups.update_state(labels, logits)
    calibration.update_state(labels, logits)
    out = {**groups.result(), **calibration.result()}
    out["nll"] = ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
    if expert_logits is not None:
        for m, metric in enumerate(expert_accuracies(np.shape(expert_logits)[1])):
            metric.update_state(labels, np.asarray(expert_logits)[:, m])
            out[metric.name] = metric.result()
    return {k: float(v) for k, v in out.items()}
