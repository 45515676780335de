"""The dataset types every source loads into (`LabeledData`, `Split`) and `DataError`."""

import dataclasses
import hashlib
from typing import Optional

import numpy as np

import tensorflow as tf


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
        digests: for image files, a fingerprint of each file's bytes (`image_check`), from
            which `fingerprint` tells the split apart from other files; None before the check.
    """

    images: np.ndarray
    labels: np.ndarray
    stream: Optional["TfdsStream"] = None
    digests: Optional[np.ndarray] = None

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
        return Split(self.images[indices], self.labels[indices], self.stream,
                     None if self.digests is None else self.digests[indices])


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
        left_out: `(path, reason)` of the image files left out because they cannot be used
            (`image_check.check_image_files` with bad_images="skip").
        ignored_files: hidden and AppleDouble files and folders an image folder holds, not read.
        skipped_files: files of an image folder left out because their name is not an image's.
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
    left_out: tuple = ()
    ignored_files: tuple = ()
    skipped_files: tuple = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_counts(self) -> np.ndarray:
        return class_counts(self.train.labels, self.num_classes)


def fingerprint(split: Split) -> Optional[str]:
    """A short hash of a split's labels and images (pixels of arrays, bytes of checked files,
    positions of TFDS records), which tells a run's data apart from other data with the same
    class counts; None for image files not yet checked."""
    h = hashlib.sha256(np.asarray(split.labels, np.int64).tobytes())
    if split.stream is not None:
        h.update(f"{split.stream.name}/{split.stream.split}/{split.stream.num_records}".encode())
        h.update(np.asarray(split.images, np.int64).tobytes())
    elif split.is_files:
        if split.digests is None:
            return None
        h.update(np.asarray(split.digests, np.int64).tobytes())
    else:
        h.update(np.ascontiguousarray(split.images).tobytes())
    return h.hexdigest()[:16]


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


def check_labels(train: Split, test: Split, num_classes: int):
    class_counts(train.labels, num_classes, "training label")
    class_counts(test.labels, num_classes, "test label")


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
