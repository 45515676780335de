"""Write the training and test images of a long-tailed image folder as 'path label' lists, so
that the official PyTorch code trains on exactly the images balpoe_tf does.

    python benchmarks/official/write_lists.py --data_path=DIR --imbalance_ratio=100 --output_dir=LISTS

Writes LISTS/train.txt (the long-tailed selection of balpoe_tf.data) and LISTS/test.txt.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import balpoe_tf  # noqa: E402,F401  (TensorFlow defaults before TF loads)
from absl import app, flags  # noqa: E402

from balpoe_tf import data as lt_data  # noqa: E402

flags.DEFINE_string("data_path", None, "Image folder with train/<class>/ and test/<class>/.", required=True)
flags.DEFINE_float("imbalance_ratio", 100.0, "Head-to-tail ratio of the training split.")
flags.DEFINE_string("output_dir", None, "Where train.txt and test.txt go.", required=True)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    data = lt_data.load_dataset("folder", imbalance_ratio=FLAGS.imbalance_ratio, data_path=FLAGS.data_path)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    for name, split in (("train", data.train), ("test", data.test)):
        with open(os.path.join(FLAGS.output_dir, f"{name}.txt"), "w") as f:
            f.writelines(f"{path} {label}\n" for path, label in zip(split.images, split.labels))
    print(f"{len(data.train)} training and {len(data.test)} test images in {FLAGS.output_dir}; "
          f"class counts {data.train_counts().tolist()}")


if __name__ == "__main__":
    app.run(main)
