"""AutoAugment with the CIFAR-10 policy (Cubuk et al. 2019), as the reference code's
`CIFAR10Policy` applies it for the long CIFAR schedule, vectorised over a batch.

Each image draws one of the 25 sub-policies; each of its two operations fires with its
own probability, at its magnitude level (0-9), with a random sign where the operation
has one. The operations follow PIL's definitions (ImageOps / ImageEnhance), on pixels
in [0, 255]; geometric ones use nearest-neighbour sampling and grey (128) fill.
"""

import numpy as np

import tensorflow as tf

# (p1, op1, level1, p2, op2, level2)
CIFAR10_POLICY = (
    (0.1, "invert", 7, 0.2, "contrast", 6), (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3), (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2), (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7), (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1), (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8), (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6), (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3), (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.6, "equalize", 4), (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8), (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3), (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3), (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
)

# Magnitude of each level 0..9.
LEVELS = {
    "shearX": np.linspace(0, 0.3, 10), "shearY": np.linspace(0, 0.3, 10),
    "translateX": np.linspace(0, 150 / 331, 10), "translateY": np.linspace(0, 150 / 331, 10),
    "rotate": np.linspace(0, 30, 10), "color": np.linspace(0.0, 0.9, 10),
    "posterize": np.round(np.linspace(8, 4, 10)), "solarize": np.linspace(256, 0, 10),
    "contrast": np.linspace(0.0, 0.9, 10), "sharpness": np.linspace(0.0, 0.9, 10),
    "brightness": np.linspace(0.0, 0.9, 10), "autocontrast": np.zeros(10),
    "equalize": np.zeros(10), "invert": np.zeros(10),
}
OPS = tuple(LEVELS)
GEOMETRIC = ("shearX", "shearY", "translateX", "translateY", "rotate")
FILL = 128.0


def _table(stage):
    ops = np.array([OPS.index(row[3 * stage + 1]) for row in CIFAR10_POLICY], np.int32)
    probs = np.array([row[3 * stage] for row in CIFAR10_POLICY], np.float32)
    mags = np.array([LEVELS[row[3 * stage + 1]][row[3 * stage + 2]] for row in CIFAR10_POLICY], np.float32)
    return ops, probs, mags


def _blend(degenerate, images, factor):
    return tf.clip_by_value(degenerate + factor[:, None, None, None] * (images - degenerate), 0, 255)


def _grey(images):
    if images.shape[-1] == 1:
        return images
    # PIL's "L" conversion (ITU-R 601-2 luma).
    return tf.round(tf.reduce_sum(images * [0.299, 0.587, 0.114], axis=-1, keepdims=True))


def _smooth(images):
    # PIL ImageFilter.SMOOTH: 3x3 kernel (centre 5, others 1) / 13; the border is kept.
    c = images.shape[-1]
    kernel = np.ones((3, 3, c, 1), np.float32)
    kernel[1, 1] = 5.0
    inner = tf.round(tf.nn.depthwise_conv2d(images, kernel / 13.0, [1, 1, 1, 1], "VALID"))
    inner = tf.pad(inner, [[0, 0], [1, 1], [1, 1], [0, 0]])
    h, w = images.shape[1], images.shape[2]
    border = np.ones((1, h, w, 1), bool)
    border[:, 1:-1, 1:-1] = False
    return tf.where(border, images, inner)


def _per_channel(images):
    b, c = tf.shape(images)[0], images.shape[-1]
    return tf.transpose(tf.reshape(tf.cast(images, tf.int32), [b, -1, c]), [0, 2, 1])  # (B, C, N)


def _from_channels(values, like):
    return tf.reshape(tf.transpose(tf.cast(values, tf.float32), [0, 2, 1]), tf.shape(like))


def _autocontrast(images):
    # PIL's LUT, int(x * scale + offset), in double precision as PIL computes it.
    x = tf.cast(images, tf.float64)
    lo = tf.reduce_min(x, axis=[1, 2], keepdims=True)
    hi = tf.reduce_max(x, axis=[1, 2], keepdims=True)
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    stretched = tf.cast(tf.clip_by_value(tf.floor(x * scale - lo * scale), 0, 255), tf.float32)
    return tf.where(hi > lo, stretched, images)


def _equalize(images):
    x = _per_channel(images)
    b, c = tf.shape(x)[0], tf.shape(x)[1]
    offsets = tf.reshape(tf.range(b * c) * 256, [b, c, 1])
    hist = tf.reshape(tf.math.bincount(tf.reshape(x + offsets, [-1]), minlength=b * c * 256),
                      [b, c, 256])
    present = hist > 0
    last = 255 - tf.argmax(tf.cast(tf.reverse(present, [-1]), tf.int32), axis=-1, output_type=tf.int32)
    step = (tf.reduce_sum(hist, -1) - tf.gather(hist, last, batch_dims=2)) // 255
    lut = (step[..., None] // 2 + tf.cumsum(hist, axis=-1, exclusive=True)) // tf.maximum(step, 1)[..., None]
    lut = tf.minimum(lut, 255)
    keep = (tf.reduce_sum(tf.cast(present, tf.int32), -1) <= 1) | (step == 0)
    equalized = tf.where(keep[..., None], x, tf.gather(lut, x, batch_dims=2))
    return _from_channels(equalized, images)


def _pixel_op(name, images, mag, sign):
    factor = 1.0 + mag * sign
    if name == "invert":
        return 255.0 - images
    if name == "autocontrast":
        return _autocontrast(images)
    if name == "equalize":
        return _equalize(images)
    if name == "posterize":
        step = tf.pow(2.0, 8.0 - mag)[:, None, None, None]
        return tf.floor(images / step) * step
    if name == "solarize":
        return tf.where(images >= mag[:, None, None, None], 255.0 - images, images)
    if name == "color":
        return _blend(tf.broadcast_to(_grey(images), tf.shape(images)), images, factor)
    if name == "contrast":
        mean = tf.floor(tf.reduce_mean(_grey(images), axis=[1, 2, 3], keepdims=True) + 0.5)
        return _blend(mean, images, factor)
    if name == "brightness":
        return _blend(tf.zeros_like(images), images, factor)
    if name == "sharpness":
        return _blend(_smooth(images), images, factor)
    raise ValueError(name)


def _geometric_transforms(op, mag, sign, h, w):
    """Output->input affine maps (8 projective parameters) per image; identity unless the
    image's operation is geometric."""
    m = mag * sign
    one, zero = tf.ones_like(m), tf.zeros_like(m)
    is_op = lambda name: tf.equal(op, OPS.index(name))  # noqa: E731
    theta = m * (np.pi / 180.0)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    cos, sin = tf.cos(theta), tf.sin(theta)
    rows = [
        (is_op("shearX"), [one, m, zero, zero, one, zero]),
        (is_op("shearY"), [one, zero, zero, m, one, zero]),
        (is_op("translateX"), [one, zero, m * w, zero, one, zero]),
        (is_op("translateY"), [one, zero, zero, zero, one, m * h]),
        (is_op("rotate"), [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy]),
    ]
    params = [one, zero, zero, zero, one, zero]
    for mask, values in rows:
        params = [tf.where(mask, v, p) for v, p in zip(values, params)]
    return tf.stack(params + [zero, zero], axis=1)


def _apply_stage(images, op, mag, sign):
    h, w = images.shape[1], images.shape[2]
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=_geometric_transforms(op, mag, sign, h, w), output_shape=[h, w],
        fill_value=FILL, interpolation="NEAREST", fill_mode="CONSTANT")
    geometric = tf.reduce_any(tf.stack([tf.equal(op, OPS.index(g)) for g in GEOMETRIC]), axis=0)
    out = tf.where(geometric[:, None, None, None], warped, images)
    for name in OPS:
        if name in GEOMETRIC:
            continue
        selected = tf.equal(op, OPS.index(name))
        out = tf.cond(tf.reduce_any(selected),
                      lambda: tf.where(selected[:, None, None, None], _pixel_op(name, images, mag, sign), out),
                      lambda: out)
    return out


def autoaugment_cifar(images, seed):
    """Apply the CIFAR-10 AutoAugment policy to a batch.

    Args:
        images: `(B, H, W, C)` float pixels in [0, 255].
        seed: `(2,)` int stateless seed.

    Returns:
        The augmented batch, float32 pixels in [0, 255].
    """
    images = tf.cast(images, tf.float32)
    b = tf.shape(images)[0]
    s_pick, *s_stages = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    policy = tf.random.stateless_uniform([b], s_pick, 0, len(CIFAR10_POLICY), tf.int32)
    for stage, s in enumerate(s_stages):
        ops, probs, mags = (tf.gather(t, policy) for t in _table(stage))
        s_fire, s_sign = tf.unstack(tf.random.experimental.stateless_split(s, 2))
        fire = tf.random.stateless_uniform([b], s_fire) < probs
        sign = tf.where(tf.random.stateless_uniform([b], s_sign) < 0.5, -1.0, 1.0)
        images = tf.round(_apply_stage(images, tf.where(fire, ops, -1), mags, sign))
    return images
