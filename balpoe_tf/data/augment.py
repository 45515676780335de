"""Training augmentation: CIFAR crop + flip as one batched warp, AutoAugment, and the
random resized crop, colour jitter and RandAugment of full-size image files."""

import numpy as np

import keras
import tensorflow as tf

from balpoe_tf.data.autoaugment import autoaugment_cifar
from balpoe_tf.data.dataset import DataError
from balpoe_tf.names import AUGMENTATIONS, IMAGE_AUGMENTATIONS


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


def rand_augment_layer():
    # Keras' own RandAugment (2 operations per image, full strength, the counterpart of
    # timm's rand-n2-m10 that the reference uses): keras-cv's needs a heavy extra package.
    return keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=1.0)


def cifar_augment(images: tf.Tensor, seed: tf.Tensor, pad: int = 4,
                  max_degrees: float = 15.0, flip: bool = True) -> tf.Tensor:
    """Pad-`pad` random crop, horizontal flip and +-`max_degrees` rotation of a batch
    (torchvision's RandomCrop(32, padding), RandomHorizontalFlip, RandomRotation), drawn
    from a stateless seed and applied by `crop_flip_rotate`.

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
    s_crop, s_flip, s_rot = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    shift = tf.cast(tf.random.stateless_uniform([b, 2], s_crop, -pad, pad + 1, tf.int32), tf.float32)
    mirror = tf.random.stateless_uniform([b], s_flip) < 0.5 if flip else tf.zeros([b], tf.bool)
    degrees = tf.random.stateless_uniform([b], s_rot, -max_degrees, max_degrees)
    return crop_flip_rotate(images, shift, mirror, degrees, rotate=max_degrees > 0)


def crop_flip_rotate(images, shift, mirror, degrees, rotate=True):
    """Crop, flip and rotation with given parameters, as one projective warp per image.

    As torchvision does them one after another on black padding: the crop window is
    shifted by `shift` from the centre, the crop mirrored where `mirror`, then rotated
    by `degrees` about its centre (counter-clockwise, as Pillow's `rotate`) with nearest
    neighbour and zero fill. The rotation leaves black not only where it reaches the
    padding but wherever it reaches outside the crop window, even over image content.

    Args:
        images: `(B, H, W, C)` batch.
        shift: `(B, 2)` float crop offsets (x, y) in pixels, in [-pad, pad].
        mirror: `(B,)` bool.
        degrees: `(B,)` rotation angles.
        rotate: whether to rotate at all (False skips the window mask).

    Returns:
        The `(B, H, W, C)` float32 batch.
    """
    h, w = images.shape[1], images.shape[2]
    theta = degrees * (np.pi / 180.0)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    cos, sin = tf.cos(theta), tf.sin(theta)
    # Output pixel p -> pixel of the crop window: rotate back about the centre.
    rot = [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy]
    # Then mirror within the window and shift it onto the image.
    sx = tf.where(mirror, -1.0, 1.0)
    full = [sx * rot[0], sx * rot[1], sx * rot[2] + tf.where(mirror, float(w - 1), 0.0) + shift[:, 0],
            rot[3], rot[4], rot[5] + shift[:, 1]]
    zeros = tf.zeros_like(theta)

    def warp(x, coefficients):
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x, transforms=tf.stack(coefficients + [zeros, zeros], axis=1), output_shape=[h, w],
            fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")

    out = warp(tf.cast(images, tf.float32), full)
    if rotate:
        out *= warp(tf.ones_like(out[..., :1]), rot)  # zero where the rotation left the window
    return out


# cifar: crop, flip, rotation (standard schedule); autoaugment: crop, flip and the
# CIFAR-10 AutoAugment policy (long schedule); crop_flip; none; and for image files
# the per-image recipes: imagenet (random resized crop, flip, colour jitter 0.4),
# inat (random resized crop, flip) and randaugment (imagenet's, then RandAugment).


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
