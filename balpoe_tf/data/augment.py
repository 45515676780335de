"""Training augmentation: CIFAR crop + flip as one batched warp, AutoAugment, and the
random resized crop, colour jitter and RandAugment of full-size image files."""

import numpy as np

import keras
import tensorflow as tf

from balpoe_tf.data.autoaugment import autoaugment_cifar
from balpoe_tf.data.dataset import DataError


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


def rand_augment_layer():
    # Keras' own RandAugment (2 operations per image, full strength, the counterpart of
    # timm's rand-n2-m10 that the reference uses): keras-cv's needs a heavy extra package.
    return keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=1.0)


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


def augment_images(images, seed, augment: str):
    if augment == "cifar":
        return cifar_augment(images, seed)
    if augment == "crop_flip":
        return cifar_augment(images, seed, max_degrees=0.0)
    if augment == "autoaugment":

        s_crop, s_policy = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        return autoaugment_cifar(cifar_augment(images, s_crop, max_degrees=0.0), s_policy)
    if augment == "none" or augment in IMAGE_AUGMENTATIONS:  # the latter are applied per image
        return tf.cast(images, tf.float32)
    raise DataError(f"unknown augmentation {augment!r}; choose one of {AUGMENTATIONS}")
