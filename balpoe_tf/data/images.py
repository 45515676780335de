"""Image files: format checks from the header, decoding and the test-time resize / centre crop."""

import tensorflow as tf




def decode_pixels(contents, channels):
    """Encoded JPEG / PNG / GIF / BMP / WebP bytes to `(height, width, channels)` uint8 pixels.

    JPEGs are decoded with libjpeg's accurate integer IDCT, the one Pillow (so torchvision
    and the official code) uses; TensorFlow's default fast IDCT differs from it by up to 4
    levels per pixel."""
    return tf.cond(tf.io.is_jpeg(contents),
                   lambda: tf.io.decode_jpeg(contents, channels=channels, dct_method="INTEGER_ACCURATE"),
                   lambda: tf.io.decode_image(contents, channels=channels, expand_animations=False))


def decode_image(contents, image_shape):
    """Encoded JPEG / PNG / GIF / BMP / WebP bytes to `image_shape` uint8 pixels (resized if needed)."""
    image = decode_pixels(contents, image_shape[-1])
    image = tf.image.resize(image, image_shape[:2], antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


# Leading bytes of the formats decode_image reads (WebP also has "WEBP" at byte 8).
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")


def _webp(contents) -> tf.Tensor:
    return (tf.strings.substr(contents, 0, 4) == b"RIFF") & (tf.strings.substr(contents + b"\0" * 12, 8, 4) == b"WEBP")


def image_file_ok(contents) -> tf.Tensor:
    """Whether encoded bytes start like a JPEG, PNG, GIF, BMP or WebP file."""
    return tf.reduce_any([tf.strings.substr(contents, 0, len(m)) == m for m in _IMAGE_MAGIC]) | _webp(contents)


def decodes_as_pillow(contents) -> tf.Tensor:
    """Whether TensorFlow decodes these bytes to the pixels Pillow gives: JPEG, PNG, GIF, WebP, and
    BMP of 16 bits or more per pixel (TensorFlow reads the palette indices of a BMP of 8 bits or
    fewer as grey levels)."""
    bmp = tf.strings.substr(contents, 0, 2) == b"BM"
    # Bits per pixel: the 2 bytes at offset 28 of a BMP header (padded for shorter files).
    bits = tf.cast(tf.io.decode_raw(tf.strings.substr(contents + b"\0" * 30, 28, 2), tf.uint8), tf.int32)
    return image_file_ok(contents) & (~bmp | (bits[0] + 256 * bits[1] >= 16))


# How far from its end a complete file's closing mark may lie (trailing bytes after it are read
# as Pillow reads them: ignored).
_TAIL = 1024


def image_complete(contents) -> tf.Tensor:
    """Whether encoded JPEG / PNG / BMP / WebP bytes hold their end: a JPEG's end-of-image marker
    or a PNG's IEND chunk within the last 1 KiB, a BMP's or WebP's declared size; a cut-off upload is caught
    here, before decoding, where the decoder's own error would not say which image it was
    (GIF and other bytes: True)."""
    tail = tf.io.decode_raw(tf.strings.substr(contents, tf.maximum(tf.strings.length(contents) - _TAIL, 0), _TAIL),
                            tf.uint8)
    head = lambda m: tf.strings.substr(contents, 0, len(m)) == m  # noqa: E731

    def marker_in_tail(first, second):
        return tf.reduce_any((tail[:-1] == first) & (tail[1:] == second))

    def png_end():
        i = tf.cast(tail, tf.int32)
        return tf.reduce_any((i[:-3] == ord("I")) & (i[1:-2] == ord("E")) & (i[2:-1] == ord("N")) & (i[3:] == ord("D")))

    return tf.case([
        (head(b"\xff\xd8\xff"), lambda: marker_in_tail(0xFF, 0xD9)),
        (head(b"\x89PNG"), png_end),
        (head(b"BM") & (tf.strings.length(contents) >= 6),
         lambda: _header_uint(contents, 2, 4, False) <= tf.cast(tf.strings.length(contents), tf.int64)),
        (_webp(contents), lambda: _header_uint(contents, 4, 4, False) + 8 <= tf.cast(tf.strings.length(contents),
                                                                                      tf.int64)),
    ], default=lambda: tf.constant(True), exclusive=True)


def _header_uint(contents, start: int, size: int, big_endian: bool) -> tf.Tensor:
    """The unsigned integer of `size` bytes at `start` (the caller checks the length)."""
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(contents, start, size), tf.uint8), tf.int64)
    powers = [256 ** i for i in range(size)]
    return tf.reduce_sum(raw * tf.constant(powers[::-1] if big_endian else powers, tf.int64))


def image_pixels(contents) -> tf.Tensor:
    """Height x width of encoded JPEG / PNG / GIF / BMP / WebP bytes, read from the header
    without decoding (int64; 0 when the header is too short to tell), so that a huge
    image can be refused before its pixels take memory."""
    head = lambda m: tf.strings.substr(contents, 0, len(m)) == m  # noqa: E731
    long_enough = lambda n: tf.strings.length(contents) >= n  # noqa: E731

    def bmp():
        height = _header_uint(contents, 22, 4, False)
        height = tf.where(height >= 2 ** 31, 2 ** 32 - height, height)  # negative: rows stored top-down
        return _header_uint(contents, 18, 4, False) * height

    def webp():
        chunk = tf.strings.substr(contents, 12, 4)
        lossless = _header_uint(contents, 21, 4, False)  # VP8L: 14 bits each of width - 1, height - 1
        sides = tf.case([
            (chunk == b"VP8X", lambda: tf.stack([_header_uint(contents, 24, 3, False),
                                                 _header_uint(contents, 27, 3, False)]) + 1),
            (chunk == b"VP8L", lambda: tf.stack([lossless % 2 ** 14, lossless // 2 ** 14 % 2 ** 14]) + 1),
        ], default=lambda: tf.stack([_header_uint(contents, 26, 2, False),
                                     _header_uint(contents, 28, 2, False)]) % 2 ** 14, exclusive=True)
        return tf.reduce_prod(sides)

    return tf.case([
        (head(b"\x89PNG") & long_enough(24),
         lambda: _header_uint(contents, 16, 4, True) * _header_uint(contents, 20, 4, True)),
        (head(b"GIF8") & long_enough(10),
         lambda: _header_uint(contents, 6, 2, False) * _header_uint(contents, 8, 2, False)),
        (head(b"BM") & long_enough(26), bmp),
        (head(b"\xff\xd8\xff"),
         lambda: tf.reduce_prod(tf.cast(tf.image.extract_jpeg_shape(contents)[:2], tf.int64))),
        (_webp(contents) & long_enough(30), webp),
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
