"""Long-tailed sampling, class priors, shot groups and the held-out split."""

import dataclasses
from typing import Sequence

import numpy as np

from balpoe_tf.data.dataset import DataError, LabeledData


# Class groups of the long-tailed literature, by training images per class.
MANY_SHOT_MIN = 100  # many: n > 100


FEW_SHOT_MAX = 20  # few: n < 20; medium: 20 <= n <= 100


# A class absent from a target prior gets this probability instead of 0, so that a
# post-hoc adjustment adds a large negative bias, never -inf.
PRIOR_FLOOR = 1e-8


# The images kept by long-tailed sampling depend on this seed only, never on the
# run seed, as in the reference (LDAM-DRW) code.
SAMPLING_SEED = 0


# Seeds the held-out split (apart from SAMPLING_SEED so the long-tailed subset does not change).
HOLDOUT_SEED = 1


def long_tailed_counts(n_max: int, num_classes: int, imbalance_ratio: float,
                       reverse: bool = False) -> np.ndarray:
    """Per-class image counts of an exponential long-tailed profile.

    Class i keeps `int(n_max * (1 / imbalance_ratio) ** (i / (C - 1)))` images, so class
    0 is the head (n_max) and class C-1 the tail (n_max / imbalance_ratio).

    Args:
        n_max: images of the largest class.
        num_classes: number of classes C.
        imbalance_ratio: head-to-tail ratio, >= 1 (1 gives a balanced set).
        reverse: give the last class n_max and the first the fewest (backward-LT).

    Returns:
        `(C,)` int64 counts.
    """
    if not imbalance_ratio >= 1:
        raise DataError(
            f"imbalance ratio must be >= 1, got {imbalance_ratio}: it is n_max / n_min "
            "(1 keeps every class at n_max, 100 makes the last class 100x rarer)"
        )
    if num_classes < 1:
        raise DataError(f"need at least one class, got num_classes={num_classes}")
    if num_classes == 1:
        return np.array([int(n_max)], dtype=np.int64)
    rank = np.arange(num_classes)
    if reverse:
        rank = rank[::-1]
    ratio = 1.0 / imbalance_ratio
    # Python floats and int() truncation, in the reference's order of operations, so
    # the sizes match it exactly (CIFAR-100 IR100: 10,847 images).
    return np.array([int(n_max * ratio ** (float(k) / (num_classes - 1.0))) for k in rank],
                    dtype=np.int64)


def long_tailed_indices(labels: np.ndarray, counts: Sequence[int],
                        seed: int = SAMPLING_SEED) -> np.ndarray:
    """Which samples a long-tailed subset keeps: for each class in order, shuffle its
    indices with one seeded generator and keep the first `counts[c]`.

    Args:
        labels: `(N,)` class ids.
        counts: images to keep per class.
        seed: seed of the generator, independent of any run seed.

    Returns:
        Indices into `labels`, grouped by class.
    """
    rng = np.random.RandomState(seed)
    kept = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise DataError(
                f"class {c} has {len(idx)} images but the long-tailed profile asks for {n}"
            )
        rng.shuffle(idx)
        kept.append(idx[:n])
    return np.concatenate(kept).astype(np.int64)


def class_prior(counts: Sequence[int]) -> np.ndarray:
    """The training prior pi_c = n_c / sum(n) from the label counts actually loaded."""
    counts = np.asarray(counts, dtype=np.float64)
    empty = np.flatnonzero(counts <= 0)
    if empty.size:
        raise DataError(
            f"class {int(empty[0])} has no training images ({empty.size} empty classes): "
            "its log prior would be -inf; give it images or drop the class"
        )
    return counts / counts.sum()


def class_groups(counts: Sequence[int]) -> dict:
    """Boolean class masks of the many (> 100), medium (20-100) and few (< 20) shot groups."""
    counts = np.asarray(counts)
    return {
        "many": counts > MANY_SHOT_MIN,
        "medium": (counts >= FEW_SHOT_MAX) & (counts <= MANY_SHOT_MIN),
        "few": counts < FEW_SHOT_MAX,
    }


def make_long_tailed(data: LabeledData, imbalance_ratio: float,
                     seed: int = SAMPLING_SEED) -> LabeledData:
    """Subsample the training split to an exponential long-tailed profile.

    n_max is the smallest class's size (for a balanced source, N / C as in the
    reference), so every class can give what the profile asks. The test split is left
    as it is.

    Args:
        data: the source dataset.
        imbalance_ratio: head-to-tail ratio (>= 1).
        seed: sampling seed (kept images do not depend on the run seed).

    Returns:
        The dataset with a long-tailed training split.
    """
    counts = data.train_counts()
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        c = int(empty[0])
        raise DataError(
            f"class {c} ({data.class_names[c]!r}) has no training images in {data.name}: "
            "every class needs images before long-tailed sampling; fix the data or the labels"
        )
    target = long_tailed_counts(int(counts.min()), data.num_classes, imbalance_ratio)
    if target.min() == 0:
        c = int(np.argmin(target))
        raise DataError(
            f"imbalance ratio {imbalance_ratio} leaves class {c} ({data.class_names[c]!r}) "
            f"with no images (n_max = {counts.min()}): lower --imbalance_ratio below "
            f"{counts.min()} or use a source with more images per class"
        )
    keep = long_tailed_indices(data.train.labels, target, seed)
    return dataclasses.replace(data, name=f"{data.name}-LT{imbalance_ratio:g}",
                               train=data.train.take(keep))


def hold_out(data: LabeledData, fraction: float, seed: int = HOLDOUT_SEED) -> LabeledData:
    """Set aside `round(fraction * n_c)` training images of each class c (at least one
    when the class has two or more), chosen by a generator seeded apart from the run, so
    every method trained on the same data holds out the same images.

    Args:
        data: dataset whose training split is divided.
        fraction: share of each class to set aside, in (0, 1).
        seed: seed of the choice.

    Returns:
        The dataset with the rest as `train` and the set-aside images as `holdout`.
    """
    counts = data.train_counts()
    if not 0 < fraction < 1:
        raise DataError(f"the held-out fraction must be in (0, 1), got {fraction}")
    taken = np.where(counts >= 2, np.maximum(np.round(fraction * counts), 1), 0).astype(np.int64)
    taken = np.minimum(taken, np.maximum(counts - 1, 0))
    held = long_tailed_indices(data.train.labels, taken, seed)
    rest = np.setdiff1d(np.arange(len(data.train)), held)
    return dataclasses.replace(data, train=data.train.take(rest), holdout=data.train.take(np.sort(held)))


def subsample(data: LabeledData, train_size: int, test_size: int, seed: int = SAMPLING_SEED) -> LabeledData:
    """At most `train_size` training (and held-out) and `test_size` test images, in their order,
    picked by a fixed seed: the small data of a quick check (some classes may lose every image).

    Args:
        data: the dataset.
        train_size, test_size: the most images a split keeps.
        seed: seed of the pick.
    """
    def pick(split, size):
        if split is None or len(split) <= size:
            return split
        return split.take(np.sort(np.random.RandomState(seed).permutation(len(split))[:size]))

    return dataclasses.replace(data, train=pick(data.train, train_size), test=pick(data.test, test_size),
                               holdout=pick(data.holdout, train_size))
