"""Peak host memory of the image-file input pipeline and of training, on CPU.

    python tools/benchmark_memory.py [--backbone=resnet50 --num_experts=3 --batch_size=64 --steps=3]
        [--precision=float32]

Generates JPEGs (a few classes, 256-320 px) with list files in a temporary folder, runs
the ImageNet-LT training pipeline alone for `--steps` batches, then `--steps` training
steps of the BalPoE model in `--precision`, and writes peak resident memory (from the
kernel's high-water mark) after each phase, and the precision, to a JSON file.
"""

import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import balpoe_tf  # noqa: E402  (TensorFlow defaults before TF loads)

balpoe_tf.import_tensorflow_quietly()
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from balpoe_tf import data as lt_data  # noqa: E402
from balpoe_tf import models, precision, run_config, run_data, task  # noqa: E402

flags.DEFINE_string("backbone", "resnet50", "Backbone.")
flags.DEFINE_integer("num_experts", 3, "Experts.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_integer("steps", 3, "Batches for the pipeline phase and training steps.")
flags.DEFINE_integer("image_size", 224, "Model input size.")
flags.DEFINE_integer("num_classes", 10, "Classes of the generated data (the classifier is C x 2048).")
flags.DEFINE_enum("precision", "float32", run_config.PRECISIONS,
                  "Compute precision, as tools/train.py --precision (auto is not offered: its measurement would "
                  "build a model in each precision and so raise the peak this tool reports).")
flags.DEFINE_string("output", "", "Where the JSON goes (default benchmarks/memory_<precision>.json).")
FLAGS = flags.FLAGS


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def write_jpegs(root, num_images, num_classes):
    rng = np.random.RandomState(0)
    lines = []
    for i in range(num_images):
        h, w = rng.randint(256, 321, size=2)
        path = f"images/{i % num_classes}/{i}.jpg"
        os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
        tf.io.write_file(os.path.join(root, path),
                         tf.io.encode_jpeg(rng.randint(0, 256, (h, w, 3)).astype(np.uint8)))
        lines.append(f"{path} {i % num_classes}")
    with open(os.path.join(root, "list.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv):
    del argv
    result = {"cpu": precision.cpu_model(), "backbone": FLAGS.backbone, "num_experts": FLAGS.num_experts,
              "batch_size": FLAGS.batch_size, "image_size": FLAGS.image_size, "steps": FLAGS.steps,
              "start_mib": peak_rss_mib()}
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, FLAGS.batch_size * 2, FLAGS.num_classes)
        config = run_config.RunConfig(
            output_dir=os.path.join(root, "run"), dataset="list", train_list=os.path.join(root, "list.txt"),
            test_list=os.path.join(root, "list.txt"), data_root=root, num_classes=FLAGS.num_classes,
            imbalance_ratio=0, image_size=FLAGS.image_size, test_crop=0.875, augment="imagenet",
            backbone=FLAGS.backbone, num_experts=FLAGS.num_experts,
            lambdas=list(np.linspace(1, -1, FLAGS.num_experts)) if FLAGS.num_experts > 1 else [0.0],
            batch_size=FLAGS.batch_size, epochs=100, schedule="cosine", warmup_epochs=0, mixup_alpha=0.3,
            precision=FLAGS.precision)
        data = run_data.load_data(config)
        pipeline = lt_data.train_pipeline(data, config.batch_size, config.epochs, augment=config.augment)
        start = time.perf_counter()
        for images, _ in pipeline.take(FLAGS.steps):
            images.numpy()
        result["pipeline_images_per_s"] = FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start)
        result["after_pipeline_mib"] = peak_rss_mib()

        with models.precision_policy(FLAGS.precision):
            model = task.build_model(config, data, lt_data.steps_per_epoch(len(data.train), config.batch_size))
        result["precision"] = model.dtype_policy.name  # what the model computes in
        result["after_model_mib"] = peak_rss_mib()
        model.fit(pipeline, steps_per_epoch=1, epochs=1, verbose=0)  # trace and first step
        start = time.perf_counter()
        model.fit(pipeline, steps_per_epoch=FLAGS.steps, epochs=1, verbose=0)
        result["train_images_per_s"] = FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start)
        result["after_training_mib"] = peak_rss_mib()
    output = FLAGS.output or f"benchmarks/memory_{FLAGS.precision.replace('mixed_', '')}.json"
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    print(f"wrote {output}")


if __name__ == "__main__":
    app.run(main)
