"""Image files: format checks from the header, decoding and the test-time resize / centre crop."""

import tensorflow as tf


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def decode_pixels(contents, channels):
    """Encoded JPEG / PNG / GIF / BMP bytes to `(height, width, channels)` uint8 pixels.

    JPEGs are decoded with libjpeg's accurate integer IDCT, the one Pillow (so torchvision
    and the official code) uses; TensorFlow's default fast IDCT differs from it by up to 4
    levels per pixel."""
    return tf.cond(tf.io.is_jpeg(contents),
                   lambda: tf.io.decode_jpeg(contents, channels=channels, dct_method="INTEGER_ACCURATE"),
                   lambda: tf.io.decode_image(contents, channels=channels, expand_animations=False))


def decode_image(contents, image_shape):
    """Encoded JPEG / PNG / GIF / BMP bytes to `image_shape` uint8 pixels (resized if needed)."""
    image = decode_pixels(contents, image_shape[-1])
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


def test_transform(contents, image_shape, test_crop: float = 0.0):
    """Encoded image bytes to test-time pixels (float, [0, 255]) of `image_shape`: the
    whole image resized, or with `test_crop` the shorter side resized to
    `size / test_crop` and the centre cropped. The serving graph uses it too."""
    if not test_crop:
        return tf.cast(decode_image(contents, image_shape), tf.float32)
    image = decode_pixels(contents, image_shape[-1])
    cropped = resize_center_crop(tf.cast(image, tf.float32), image_shape[:2], test_crop)
    return tf.round(tf.clip_by_value(cropped, 0, 255))
