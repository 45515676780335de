"""tf.data pipelines: seeded, resumable training batches and in-order test batches."""

from typing import Optional

import numpy as np

import tensorflow as tf

from balpoe_tf.names import AUGMENTATIONS, IMAGE_AUGMENTATIONS
from balpoe_tf.data.augment import (augment_images, color_jitter,
                                    rand_augment_layer, random_resized_crop)
from balpoe_tf.data.dataset import DataError, LabeledData, Split, STREAM_SHUFFLE_BUFFER
from balpoe_tf.data.images import decode_pixels, image_file_ok, test_transform


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch; the last one may be smaller (no images are dropped)."""
    return -(-num_examples // batch_size)


def _file_image(contents, data: LabeledData, augment: Optional[str], seed, rand_augment=None):
    """A decoded, transformed image file: `image_shape` float pixels in [0, 255]."""
    size = data.image_shape[:2]
    if augment in IMAGE_AUGMENTATIONS:
        image = tf.cast(decode_pixels(contents, data.image_shape[-1]), tf.float32)
        s_crop, s_flip, s_jitter = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        image = tf.image.stateless_random_flip_left_right(random_resized_crop(image, size, s_crop), s_flip)
        image = tf.ensure_shape(image, data.image_shape)  # the crop's dynamic slice loses the shape
        if augment == "inat":
            return image
        image = color_jitter(image, s_jitter)
        return rand_augment(image) if rand_augment is not None else image
    return test_transform(contents, data.image_shape, data.test_crop)


def _batches(data: LabeledData, split: Split, order: tf.Tensor, batch_size: int, augment=None,
             seed=None, rand_augment=None, skip=0) -> tf.data.Dataset:
    """`(images, labels)` batches of `split` in the given order, the first `skip` examples
    left out (read no further than their position). Image files are read and transformed
    one by one; `image_check.check_image_files` has checked them, and a file that does not
    start like an image fails with its path."""
    if split.stream is not None:
        return _stream_batches(data, split, batch_size, augment, seed, rand_augment, skip)
    labels = tf.constant(split.labels, tf.int32)
    indices = tf.data.Dataset.from_tensor_slices(order[skip:])
    if not split.is_files:
        images = tf.constant(split.images)
        return indices.batch(batch_size).map(lambda i: (tf.gather(images, i), tf.gather(labels, i)))
    paths = tf.constant(split.images)

    def load(i):
        contents = tf.io.read_file(paths[i])
        check = tf.debugging.Assert(image_file_ok(contents), ["not a JPEG/PNG/GIF/BMP image:", paths[i]])
        with tf.control_dependencies([check]):
            contents = tf.identity(contents)
        example_seed = None if seed is None else tf.random.experimental.stateless_fold_in(seed, i)
        return _file_image(contents, data, augment, example_seed, rand_augment), labels[i]

    return indices.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)


def _stream_batches(data: LabeledData, split: Split, batch_size: int, augment=None, seed=None,
                    rand_augment=None, skip=0) -> tf.data.Dataset:
    """`(images, labels)` batches of a streamed split: its records in file order (test) or
    shuffled through a buffer seeded by `seed` (training), the first `skip` left out before
    decoding, each decoded and transformed as an image file is, with a per-record stateless
    seed."""
    kept = np.zeros(split.stream.num_records, bool)
    kept[split.images] = True
    kept = tf.constant(kept)
    ds = split.stream.records().filter(lambda i, contents, label: tf.gather(kept, i))
    if seed is not None:
        ds = ds.shuffle(STREAM_SHUFFLE_BUFFER, seed=seed[0] * 1_000_003 + seed[1], reshuffle_each_iteration=False)
    ds = ds.skip(skip)

    def load(i, contents, label):
        example_seed = None if seed is None else tf.random.experimental.stateless_fold_in(seed, i)
        return _file_image(contents, data, augment, example_seed, rand_augment), label

    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)


def normalizer(mean, std):
    """The test-time transform: pixels in [0, 255] to `(x / 255 - mean) / std`."""
    mean = tf.constant(np.array(mean) * 255.0, tf.float32)
    std = tf.constant(np.array(std) * 255.0, tf.float32)
    return lambda images: (tf.cast(images, tf.float32) - mean) / std


def train_pipeline(data: LabeledData, batch_size: int, epochs: int, seed: int = 0,
                   augment: str = "cifar", start_epoch: int = 0, start_step: int = 0) -> tf.data.Dataset:
    """Shuffled, augmented, normalised training batches for epochs [start_epoch, epochs),
    the first from its step `start_step`.

    Each epoch's order and augmentation come from stateless seeds derived from
    `(seed, epoch)` and each batch's from its step, so a run resumed at any step sees
    exactly the batches an uninterrupted run would.

    Args:
        data: dataset whose `train` split is used.
        batch_size: global batch size.
        epochs: last epoch (exclusive).
        seed: run seed.
        augment: one of `AUGMENTATIONS`.
        start_epoch: first epoch.
        start_step: batches of the first epoch that are left out (a run resumed inside it).

    Returns:
        A dataset of `(images float32 (B, H, W, C), labels int32 (B,))`,
        `steps_per_epoch(len(train), batch_size)` batches per epoch (fewer in the first with
        `start_step`).
    """
    if augment not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {augment!r}; choose one of {AUGMENTATIONS}")
    if augment in IMAGE_AUGMENTATIONS and not (data.train.is_files or data.train.stream is not None):
        raise DataError(f"--augment={augment} crops full-size image files; {data.name} is arrays of "
                        "small images: use cifar, autoaugment, crop_flip or none")
    split, n = data.train, len(data.train)
    normalize = normalizer(data.mean, data.std)
    # A Keras layer holds a seed variable, so it is made here, outside the traced epochs.
    rand_augment = rand_augment_layer() if augment == "randaugment" else None

    def epoch_batches(epoch):
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), epoch_seed)
        skip = tf.where(epoch == start_epoch, tf.constant(start_step, tf.int64), 0)
        batches = tf.data.Dataset.zip((tf.data.Dataset.range(skip, tf.int64.max),
                                       _batches(data, split, order, batch_size, augment, epoch_seed, rand_augment,
                                                skip * batch_size)))

        def prepare(step, batch):
            images, labels = batch
            step_seed = tf.random.experimental.stateless_fold_in(epoch_seed, step)
            return normalize(augment_images(images, step_seed, augment)), labels

        return batches.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    ds = tf.data.Dataset.range(start_epoch, epochs).flat_map(epoch_batches)
    return ds.prefetch(tf.data.AUTOTUNE)


def test_pipeline(data: LabeledData, batch_size: int, split: Optional[Split] = None) -> tf.data.Dataset:
    """Normalised batches of the test split (or of `split`), in order, with the test
    transform (for image files: resize, or resize and centre crop with `test_crop`)."""
    split = data.test if split is None else split
    normalize = normalizer(data.mean, data.std)
    order = tf.range(len(split), dtype=tf.int64)
    ds = _batches(data, split, order, batch_size)
    ds = ds.map(lambda x, y: (normalize(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
