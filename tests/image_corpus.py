"""One generated corpus of image files, good and bad, for the tests of every path that decodes
files: image folders and list files, TFDS image-file records, tools/predict.py,
tools/evaluate.py and the serving signatures.

`write_corpus(folder)` writes it and returns `{file name: Kind}`: what each file is, whether
Pillow reads it, and the pixels a model input is made from (Pillow's, converted to RGB, except
16-bit images, which keep their high byte where Pillow clips them at 255).
"""

import dataclasses
import io
from typing import Optional

import numpy as np
from PIL import Image

# A side above which one image exceeds the 40-megapixel limit (6400 x 6400 = 41 MP).
HUGE_SIDE = 6400


@dataclasses.dataclass(frozen=True)
class Kind:
    """One file of the corpus.

    Attributes:
        readable: Pillow reads it as an image (so the project must too).
        pixels: the RGB uint8 pixels it stands for (None when not readable, or huge).
        problem: for a file that must be refused, words its error names.
    """

    readable: bool
    pixels: Optional[np.ndarray] = None
    problem: str = ""


def _picture(height, width, seed=0):
    """Smooth colour gradients with some noise: compresses like a photograph."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     (x + y) * 127 / max(height + width - 2, 1)], -1)
    return np.clip(base + rng.randint(-12, 13, (height, width, 3)), 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG (grayscale `(H, W)` or RGB `(H, W, 3)`), written by TensorFlow since Pillow
    writes no 16-bit RGB."""
    import tensorflow as tf

    return tf.io.encode_png(values if values.ndim == 3 else values[..., None]).numpy()


def corpus() -> dict:
    """`{file name: (bytes, Kind)}` of every case."""
    small, large = _picture(24, 20, 1), _picture(600, 500, 2)
    rgb = Image.fromarray(small)
    files = {}

    def good(name, data, pixels=None):
        files[name] = (data, Kind(True, _pillow_rgb(data) if pixels is None else pixels))

    def bad(name, data, problem):
        files[name] = (data, Kind(False, None, problem))

    good("rgb.jpg", _encode(rgb, "JPEG", quality=90))
    good("progressive.jpg", _encode(rgb, "JPEG", quality=90, progressive=True))
    good("gray.jpg", _encode(rgb.convert("L"), "JPEG"))
    good("cmyk.jpg", _encode(rgb.convert("CMYK"), "JPEG"))
    good("large.jpg", _encode(Image.fromarray(large), "JPEG", quality=85))
    good("rgb.png", _encode(rgb, "PNG"))
    good("gray.png", _encode(rgb.convert("L"), "PNG"))
    good("gray_alpha.png", _encode(rgb.convert("LA"), "PNG"))
    good("rgba.png", _encode(rgb.convert("RGBA"), "PNG"))
    good("palette.png", _encode(rgb.convert("P", palette=Image.ADAPTIVE, colors=16), "PNG"))
    transparent = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    transparent.info["transparency"] = 0
    good("palette_transparent.png", _encode(transparent, "PNG", transparency=0))
    gray16 = (np.arange(24 * 20).reshape(24, 20) * 137).astype(np.uint16)
    good("gray16.png", _png16(gray16), np.repeat((gray16 >> 8).astype(np.uint8)[..., None], 3, -1))
    rgb16 = small.astype(np.uint16) * 257 + 100
    good("rgb16.png", _png16(rgb16), (rgb16 >> 8).astype(np.uint8))
    good("still.gif", _encode(rgb.convert("P", palette=Image.ADAPTIVE), "GIF"))
    frames = [rgb.convert("P", palette=Image.ADAPTIVE), Image.fromarray(_picture(24, 20, 5)).convert("P")]
    good("animated.gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    good("rgb.bmp", _encode(rgb, "BMP"))
    good("palette.bmp", _encode(rgb.convert("P", palette=Image.ADAPTIVE), "BMP"))
    good("png_named.jpg", _encode(rgb, "PNG"))  # the extension does not match the format
    good("jpeg_named.png", _encode(rgb, "JPEG"))
    good("webp_named.jpg", _encode(rgb, "WEBP", lossless=True))
    good("lossy.webp", _encode(rgb, "WEBP", quality=80))
    good("scan.tif", _encode(rgb, "TIFF"))  # a format TensorFlow does not decode
    whole = _encode(rgb, "JPEG", quality=90)
    bad("truncated_small.jpg", whole[:len(whole) // 2], "cannot be decoded")
    whole_large = _encode(Image.fromarray(large), "JPEG", quality=85)
    bad("truncated_large.jpg", whole_large[:int(len(whole_large) * 0.7)], "cannot be decoded")
    bad("truncated.png", _encode(rgb, "PNG")[:200], "cannot be decoded")
    bad("empty.jpg", b"", "empty file")
    bad("text.jpg", b"this is not an image\n", "not an image")
    files["huge.png"] = (_encode(Image.new("L", (HUGE_SIDE, HUGE_SIDE)), "PNG"),
                         Kind(True, None, "pixels, more than"))
    return files


def write_corpus(folder, names=None) -> dict:
    """Write the corpus (or the files `names` of it) into `folder`; returns `{name: Kind}`."""
    kinds = {}
    for name, (data, kind) in corpus().items():
        if names is None or name in names:
            (folder / name).write_bytes(data)
            kinds[name] = kind
    return kinds
