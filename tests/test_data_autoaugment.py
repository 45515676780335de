import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from balpoe_tf.data import autoaugment as aa
from balpoe_tf import data as lt_data

RNG = np.random.RandomState(0)
IMAGES = RNG.randint(0, 256, (3, 12, 12, 3)).astype(np.uint8)
IMAGES[1] = IMAGES[1] // 3 + 60  # low contrast, so autocontrast / equalize do something


def _ours(name, mag, sign=1.0):
    n = len(IMAGES)
    out = aa._pixel_op(name, tf.constant(IMAGES, tf.float32), tf.constant([mag] * n, tf.float32),
                       tf.constant([sign] * n))
    return tf.round(out).numpy()


def _pil(fn):
    return np.stack([np.asarray(fn(Image.fromarray(i))) for i in IMAGES]).astype(np.float32)


@pytest.mark.parametrize("name,mag,pil", [
    ("equalize", 0, ImageOps.equalize),
    ("autocontrast", 0, ImageOps.autocontrast),
    ("invert", 0, ImageOps.invert),
    ("posterize", 5, lambda im: ImageOps.posterize(im, 5)),
    ("solarize", 100, lambda im: ImageOps.solarize(im, 100)),
])
def test_exact_ops_match_pil(name, mag, pil):
    np.testing.assert_array_equal(_ours(name, mag), _pil(pil))


@pytest.mark.parametrize("name,enhancer", [("color", ImageEnhance.Color), ("contrast", ImageEnhance.Contrast),
                                           ("brightness", ImageEnhance.Brightness),
                                           ("sharpness", ImageEnhance.Sharpness)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_enhance_ops_match_pil_up_to_rounding(name, enhancer, sign):
    ours = _ours(name, 0.5, sign)
    pil = _pil(lambda im: enhancer(im).enhance(1.0 + 0.5 * sign))
    assert np.abs(ours - pil).max() <= 1.0


def test_translate_shifts_with_grey_fill():
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    op = tf.constant([aa.OPS.index("translateX")])
    out = aa._apply_stage(tf.constant(image), op, tf.constant([0.25]), tf.constant([1.0])).numpy()
    # input_x = x + 0.25 * 4: column x shows column x + 1; the last column is filled.
    np.testing.assert_array_equal(out[0, :, :3, 0], image[0, :, 1:, 0])
    np.testing.assert_array_equal(out[0, :, 3, 0], aa.FILL)


def test_no_operation_keeps_the_image():
    images = tf.constant(IMAGES, tf.float32)
    out = aa._apply_stage(images, tf.constant([-1, -1, -1]), tf.zeros([3]), tf.ones([3]))
    np.testing.assert_array_equal(out, images)


def test_policy_tables_and_batch_output():
    ops, probs, mags = aa._table(1)
    assert len(ops) == 25 and aa.OPS[ops[0]] == "contrast" and probs[0] == pytest.approx(0.2)
    assert mags[5] == 5.0  # posterize level 7 -> round(8 - 4 * 7 / 9) = 5 bits
    out = aa.autoaugment_cifar(tf.constant(IMAGES, tf.float32), tf.constant([0, 1], tf.int64)).numpy()
    assert out.shape == IMAGES.shape and out.min() >= 0 and out.max() <= 255
    np.testing.assert_array_equal(out, np.round(out))
    again = aa.autoaugment_cifar(tf.constant(IMAGES, tf.float32), tf.constant([0, 1], tf.int64)).numpy()
    np.testing.assert_array_equal(out, again)


@pytest.mark.slow
def test_pipeline_with_autoaugment():
    data = lt_data.from_arrays("a", IMAGES, [0, 1, 2], IMAGES, [0, 1, 2])
    images, labels = next(iter(lt_data.train_pipeline(data, 3, 1, augment="autoaugment")))
    assert images.shape == (3, 12, 12, 3) and labels.shape == (3,)
