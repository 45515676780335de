"""What checking every image file before training costs (`data.check_image_files`).

    python tools/benchmark_image_check.py [--images=10000] [--sizes=32x32,500x375] \\
        [--json=benchmarks/image_check.json]

For each size, generates `--images` JPEGs (quality 90, smooth gradients with noise, two
classes) in a temporary image folder, then times the check of its training split twice: with
no record (every file decoded, as a new run does) and with the record the first check left (a
resumed run or an evaluation: files unchanged). The files are freshly written, so they are
read from the page cache; a cold disk adds its read time. Writes JSON and a Markdown table.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import balpoe_tf  # noqa: E402  (TensorFlow defaults before TF loads)

balpoe_tf.import_tensorflow_quietly()

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from balpoe_tf import data as lt_data  # noqa: E402
from balpoe_tf import reporting  # noqa: E402

flags.DEFINE_integer("images", 10000, "JPEGs per size.")
flags.DEFINE_list("sizes", ["32x32", "500x375"], "Image sizes, WIDTHxHEIGHT.")
flags.DEFINE_string("json", "benchmarks/image_check.json", "Where the JSON goes (and .md beside it).")
FLAGS = flags.FLAGS

# Distinct images generated per size; the rest are copies under other names (decoding them
# costs the same, generating them would not).
DISTINCT = 50


def write_folder(root: str, width: int, height: int, images: int) -> int:
    """`root/train/{0,1}/*.jpg` and a test image per class; returns the bytes written."""
    rng = np.random.RandomState(0)
    y, x = np.mgrid[0:height, 0:width]
    encoded = []
    for i in range(DISTINCT):
        base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y + i) % 256], -1)
        pixels = np.clip(base + rng.randint(-25, 26, (height, width, 3)), 0, 255).astype(np.uint8)
        path = os.path.join(root, "sample.jpg")
        Image.fromarray(pixels).save(path, quality=90)
        with open(path, "rb") as f:
            encoded.append(f.read())
    total = 0
    for split, count in (("train", images), ("test", 2)):
        for c in range(2):
            os.makedirs(os.path.join(root, split, str(c)), exist_ok=True)
        for i in range(count):
            with open(os.path.join(root, split, str(i % 2), f"{i:06d}.jpg"), "wb") as f:
                f.write(encoded[i % DISTINCT])
            total += len(encoded[i % DISTINCT])
    os.remove(os.path.join(root, "sample.jpg"))
    return total


def measure(size: str) -> dict:
    width, height = (int(v) for v in size.split("x"))
    with tempfile.TemporaryDirectory() as root:
        total = write_folder(root, width, height, FLAGS.images)
        data = lt_data.load_image_folder(root, image_size=32)
        record = os.path.join(root, "record")
        seconds = {}
        for when in ("first", "recorded"):
            start = time.perf_counter()
            checked = lt_data.check_image_files(data, "fail", record, splits=("train",))
            seconds[when] = time.perf_counter() - start
        assert len(checked.train) == FLAGS.images
    row = {"size": size, "images": FLAGS.images, "mean_bytes": total / (FLAGS.images + 2),
           "first_seconds": seconds["first"], "recorded_seconds": seconds["recorded"],
           "first_seconds_per_10000": seconds["first"] * 10000 / FLAGS.images}
    print(json.dumps(row), flush=True)
    return row


def main(argv):
    del argv
    rows = [measure(size) for size in FLAGS.sizes]
    result = {"date": time.strftime("%Y-%m-%d"), "cores": len(os.sched_getaffinity(0)), "runs": rows}
    table = reporting.markdown_table(
        ["size", "mean file", "first check", "per 10,000", "with the record"],
        [[r["size"], f"{r['mean_bytes'] / 1024:.1f} KiB", f"{r['first_seconds']:.1f} s",
          f"{r['first_seconds_per_10000']:.1f} s", f"{r['recorded_seconds']:.2f} s"] for r in rows])
    reporting.write_benchmark(FLAGS.json, result, [
        f"Checking {FLAGS.images:,} JPEGs before training ({result['date']}, {result['cores']} cores, files in the "
        "page cache)", "", *table])


if __name__ == "__main__":
    app.run(main)
