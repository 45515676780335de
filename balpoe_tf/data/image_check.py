"""Every image file a run reads, checked before any training: decoded as the pipelines decode
it, read with Pillow where TensorFlow cannot, and then kept, converted or named.

A file TensorFlow decodes to the pixels Pillow gives (JPEG, PNG, GIF, WebP, BMP of 16 bits or
more per pixel) is kept as it is. A file only Pillow reads (TIFF, ICO, and BMP of 8 bits or
fewer, which TensorFlow misreads) is converted once to a PNG of Pillow's pixels, which the
pipelines read instead. 16-bit images keep their high byte, as TensorFlow's PNG decoder does (Pillow clips
them at 255, which turns most of them white). Any other file (empty, not an image, truncated,
damaged, over the pixel limit) is named with the reason.

The result of each file (with its size and modification time) is kept in a record, so that a
resumed run or a later evaluation checks only files that changed.
"""

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

import tensorflow as tf

from balpoe_tf import quiet_native_stderr
from balpoe_tf.names import MAX_IMAGE_PIXELS
from balpoe_tf.data.dataset import DataError, LabeledData, Split
from balpoe_tf.data.images import decode_pixels, decodes_as_pillow, image_complete, image_pixels

# Bump when what the check accepts changes, so that older records are checked again.
RECORD_VERSION = 1
RECORD_FILE = "files.json"
CONVERTED_FOLDER = "converted"

# How many bad files an error lists before it gives the count of the rest.
LISTED = 20

_DIGEST_BUCKETS = 2 ** 62


@dataclasses.dataclass(frozen=True)
class FileCheck:
    """What the check found for one file.

    Attributes:
        digest: a 62-bit fingerprint of the file's bytes (0 when unreadable).
        reason: why the file cannot be used ("" when it can).
        converted: the PNG the pipelines read instead ("" when the file itself is read).
    """

    digest: int
    reason: str = ""
    converted: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


def _decodes(contents, channels: int, max_pixels: int, readable=True) -> tf.Tensor:
    """Whether TensorFlow decodes `contents` as the pipelines do, where it is `readable` and has
    at most `max_pixels` (from its header: larger images are never decoded); a decoding error
    is raised, for the caller's dataset to drop."""
    return tf.cond(readable & (image_pixels(contents) <= max_pixels),
                   lambda: tf.size(decode_pixels(contents, channels)) > 0, lambda: tf.constant(False))


def _tensorflow_pass(paths: Sequence[str], channels: int, max_pixels: int) -> Dict[int, int]:
    """{index: digest} of the files TensorFlow reads and decodes to Pillow's pixels within
    `max_pixels`, decoding them as the pipelines do, in parallel; a file that fails is left out."""

    def check(i, path):
        contents = tf.io.read_file(path)
        usable = _decodes(contents, channels, max_pixels, decodes_as_pillow(contents))
        return i, tf.strings.to_hash_bucket_fast(contents, _DIGEST_BUCKETS), usable

    ds = tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64), tf.constant(list(paths))))
    ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors()
    with quiet_native_stderr():  # libjpeg's own lines about the files that fail, named later
        return {int(i): int(d) for i, d, usable in ds.as_numpy_iterator() if usable}


def _digest(contents: bytes) -> int:
    return int(tf.strings.to_hash_bucket_fast(tf.constant(contents), _DIGEST_BUCKETS))


def pillow_pixels(contents: bytes, channels: int,
                  max_pixels: int = MAX_IMAGE_PIXELS) -> Tuple[Optional[np.ndarray], str]:
    """`(pixels, "")` of an image Pillow reads (`(H, W, channels)` uint8: RGB or grey, the first
    frame, 16-bit values reduced to their high byte), or `(None, reason)`."""
    from PIL import Image

    if not contents:
        return None, "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(contents)) as image:
            width, height = image.size
            if width * height > max_pixels:
                return None, (f"{width} x {height} = {width * height:,} pixels, more than the limit of "
                              f"{max_pixels:,}: downscale it")
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                image = Image.fromarray((np.asarray(image, np.uint32) >> 8).clip(0, 255).astype(np.uint8))
            pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    except Image.UnidentifiedImageError:
        return None, "not an image (neither TensorFlow nor Pillow can read it)"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return None, f"cannot be decoded ({e}): the file is truncated or damaged"
    return (pixels if channels == 3 else pixels[..., None]), ""


def inspect_bytes(contents: bytes, channels: int = 3, max_pixels: int = MAX_IMAGE_PIXELS) -> Tuple[str, bytes]:
    """`(reason, usable)` of one encoded image: `usable` is bytes the pipelines and the serving
    signatures decode to the image's pixels (`contents` itself, or a PNG made from Pillow's
    pixels), or "" with the `reason` it cannot be used."""
    if contents and bool(decodes_as_pillow(tf.constant(contents)) & image_complete(tf.constant(contents))):
        try:
            with quiet_native_stderr():
                if int(image_pixels(tf.constant(contents))) <= max_pixels:
                    decode_pixels(tf.constant(contents), channels)
                    return "", contents
        except tf.errors.InvalidArgumentError:
            pass  # Pillow says why below
    pixels, reason = pillow_pixels(contents, channels, max_pixels)
    if pixels is None:
        return reason, b""
    return "", tf.io.encode_png(pixels).numpy()


def _stat(path: str):
    try:
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns]
    except OSError:
        return None


class ImageRecord:
    """The checked files of a run (`<folder>/files.json`) and their converted PNGs, written by
    `save` only: a check that refuses the data leaves nothing behind."""

    def __init__(self, folder: Optional[str]):
        self.folder = folder
        self.files, self.pending = {}, {}
        if folder and os.path.isfile(os.path.join(folder, RECORD_FILE)):
            try:
                with open(os.path.join(folder, RECORD_FILE)) as f:
                    saved = json.load(f)
                if saved.get("version") == RECORD_VERSION:
                    self.files = saved["files"]
            except (OSError, ValueError, KeyError, TypeError):
                self.files = {}  # a damaged record: check again

    def known(self, path: str, stat) -> Optional[FileCheck]:
        entry = self.files.get(path)
        if not isinstance(entry, list) or stat is None or entry[:2] != stat:
            return None
        check = FileCheck(*entry[2:])
        return None if check.converted and not os.path.isfile(check.converted) else check

    def keep(self, path: str, stat, check: FileCheck):
        if stat is not None:
            self.files[path] = [*stat, check.digest, check.reason, check.converted]

    def convert(self, path: str, png: bytes, temporary_folder: str) -> str:
        """Where the PNG converted from `path` is read from (written now without a record
        folder, else when the record is saved)."""
        name = hashlib.sha1(path.encode()).hexdigest()[:20] + ".png"
        if not self.folder:
            with open(os.path.join(temporary_folder, name), "wb") as f:
                f.write(png)
            return os.path.join(temporary_folder, name)
        converted = os.path.join(os.path.abspath(self.folder), CONVERTED_FOLDER, name)
        self.pending[converted] = png
        return converted

    def save(self):
        if not self.folder:
            return
        os.makedirs(os.path.join(self.folder, CONVERTED_FOLDER), exist_ok=True)
        for path, png in self.pending.items():
            with open(path, "wb") as f:
                f.write(png)
        tmp = os.path.join(self.folder, RECORD_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"version": RECORD_VERSION, "files": self.files}, f)
        os.replace(tmp, os.path.join(self.folder, RECORD_FILE))


def check_files(paths: Sequence[str], channels: int, record: ImageRecord, max_pixels: int = MAX_IMAGE_PIXELS,
                temporary_folder: str = "") -> list:
    """A `FileCheck` for each of `paths`: from the record where the file has not changed, else
    decoded by TensorFlow in parallel, and the files it cannot decode read by Pillow one by one
    (converted to PNG under the record's folder, or `temporary_folder` without one)."""
    paths = [os.path.abspath(p) for p in paths]
    stats = [_stat(p) for p in paths]
    checks = [record.known(p, s) for p, s in zip(paths, stats)]
    todo = [i for i, c in enumerate(checks) if c is None]
    decoded = _tensorflow_pass([paths[i] for i in todo], channels, max_pixels) if todo else {}
    for position, i in enumerate(todo):
        if position in decoded:
            checks[i] = FileCheck(decoded[position])
            continue
        try:
            with open(paths[i], "rb") as f:
                contents = f.read()
        except OSError as e:
            checks[i] = FileCheck(0, f"cannot be read ({e.strerror})")
            continue
        pixels, reason = pillow_pixels(contents, channels, max_pixels)
        if pixels is None:
            checks[i] = FileCheck(_digest(contents), reason)
            continue
        converted = record.convert(paths[i], tf.io.encode_png(pixels).numpy(), temporary_folder)
        checks[i] = FileCheck(_digest(contents), "", converted)
    for i in todo:
        record.keep(paths[i], stats[i], checks[i])
    return checks


def _check_stream(split: Split, channels: int, record: ImageRecord, max_pixels: int):
    """`(usable mask, [(record name, reason)])` of a streamed TFDS split: every record decoded as
    the pipelines decode it. TFDS stored the bytes, so a record TensorFlow cannot decode is
    named (with Pillow's reason, or that only Pillow reads it), never converted."""
    stream = split.stream
    positions = hashlib.sha1(np.asarray(split.images, np.int64).tobytes()).hexdigest()[:12]
    key = f"tfds:{stream.name}/{stream.split}/{stream.num_records}/{positions}"
    bad = record.files.get(key)
    if not isinstance(bad, dict):
        wanted = tf.constant(np.isin(np.arange(stream.num_records), split.images))

        def check(i, contents, label):
            return i, _decodes(contents, channels, max_pixels)

        records = stream.records().filter(lambda i, contents, label: tf.gather(wanted, i))
        with quiet_native_stderr():
            usable = {int(i) for i, ok in records.map(check, num_parallel_calls=tf.data.AUTOTUNE,
                                                       deterministic=False).ignore_errors().as_numpy_iterator() if ok}
        failed = set(int(i) for i in split.images) - usable
        bad = {}
        if failed:
            lookup = tf.constant(np.isin(np.arange(stream.num_records), sorted(failed)))
            for i, contents, _ in stream.records().filter(lambda i, c, l: tf.gather(lookup, i)).as_numpy_iterator():
                pixels, reason = pillow_pixels(contents, channels, max_pixels)
                bad[str(int(i))] = reason or "TensorFlow cannot decode it (Pillow can): prepare the dataset again"
        record.files[key] = bad
    names = [f"{stream.name} {stream.split} record {int(i)}" for i in split.images]
    problems = [bad.get(str(int(i)), "") for i in split.images]
    return np.array([not p for p in problems], bool), [(n, p) for n, p in zip(names, problems) if p]


def _check_split(split: Split, channels: int, record: ImageRecord, max_pixels: int, temporary_folder: str):
    checks = check_files(split.images, channels, record, max_pixels, temporary_folder)
    usable = np.array([c.ok for c in checks], bool)
    images = np.array([c.converted or p for p, c in zip(split.images, checks)], dtype=str)
    digests = np.array([c.digest for c in checks], np.int64)
    bad = [(str(p), c.reason) for p, c in zip(split.images, checks) if not c.ok]
    return Split(images, split.labels, digests=digests), usable, bad


def check_image_files(data: LabeledData, bad_images: str = "fail", record_folder: Optional[str] = None,
                      splits: Sequence[str] = ("train", "holdout", "test"),
                      max_pixels: int = MAX_IMAGE_PIXELS) -> LabeledData:
    """`data` with its image files and streamed TFDS records checked (module docstring); arrays pass.

    Args:
        data: the loaded data.
        bad_images: "fail": raise `DataError` naming the files that cannot be used (the first
            `LISTED` and the count) and the fix, before any work; "skip": leave them out
            (`LabeledData.left_out` lists them), so that class counts and the prior are those
            of the images used.
        record_folder: where the record of checked files and the converted PNGs are kept (None:
            no record, conversions in a temporary folder).
        splits: the splits to check (an evaluation reads only the test split).
        max_pixels: larger images are refused from their header, before decoding.

    Returns:
        The data with unusable files left out, converted files replaced by their PNG, and each
        file's content digest (`Split.digests`) for `dataset.fingerprint`.
    """
    record = ImageRecord(record_folder)
    temporary = "" if record_folder else tempfile.mkdtemp(prefix="balpoe_tf_converted_")
    replaced, bad_files = {}, []
    for name in splits:
        split = getattr(data, name)
        if split is not None and split.stream is not None:
            usable, bad = _check_stream(split, data.image_shape[-1], record, max_pixels)
            replaced[name] = split.take(np.flatnonzero(usable))
        elif split is not None and split.is_files:
            checked, usable, bad = _check_split(split, data.image_shape[-1], record, max_pixels, temporary)
            replaced[name] = checked.take(np.flatnonzero(usable))
        else:
            continue
        bad_files += [(name, path, reason) for path, reason in bad]
    if bad_files and bad_images == "fail":
        lines = "\n".join(f"  {path}: {reason}" for _, path, reason in bad_files[:LISTED])
        more = f"\n  ... and {len(bad_files) - LISTED} more" if len(bad_files) > LISTED else ""
        raise DataError(f"{len(bad_files)} image file(s) cannot be used:\n{lines}{more}\nReplace or delete them, "
                        "or pass --bad_images=skip to train without them (they are then listed in the log and "
                        "config.json)")
    for name, split in replaced.items():
        before = np.bincount(getattr(data, name).labels, minlength=data.num_classes)
        emptied = np.flatnonzero((before > 0) & (np.bincount(split.labels, minlength=data.num_classes) == 0))
        if bad_files and len(emptied):
            raise DataError(f"class {data.class_names[emptied[0]]!r} has no {name} images left once the unusable "
                            f"files are left out ({len(emptied)} such class(es)): replace its files")
    record.save()
    return dataclasses.replace(data, **replaced, left_out=data.left_out + tuple((p, r) for _, p, r in bad_files))
