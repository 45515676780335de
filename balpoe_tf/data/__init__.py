"""Long-tailed data: sources, long-tailed sampling, class priors, augmentation and tf.data
pipelines.

Every source (TFDS, `.npz` arrays, an image folder, a list file, the bundled digits) loads
into the same `LabeledData`, so the long-tailed sampling, the prior and the pipelines apply
to all of them alike. Modules, each importing only those above it:

- `dataset`: `LabeledData`, `Split`, `DataError`, `class_counts`;
- `longtail`: long-tailed profiles and sampling, class priors, shot groups, the held-out split;
- `images`: image headers, decoding and the test transform;
- `image_check`: every image file checked before training (kept, converted or named);
- `autoaugment`, `augment`: training augmentation;
- `sources`: every source and `load_dataset`;
- `pipelines`: the tf.data training and test pipelines.
"""

from balpoe_tf.data.dataset import (class_counts, DataError, fingerprint, LabeledData, Split, STREAM_SHUFFLE_BUFFER,
                                    TfdsStream)
from balpoe_tf.data.longtail import (class_groups, class_prior, FEW_SHOT_MAX, hold_out, HOLDOUT_SEED,
                                     long_tailed_counts, long_tailed_indices, make_long_tailed, MANY_SHOT_MIN,
                                     PRIOR_FLOOR, SAMPLING_SEED, subsample)
from balpoe_tf.data.images import (decode_image, decode_pixels, decodes_as_pillow, image_complete, image_file_ok,
                                   image_pixels, resize_center_crop, test_transform)
from balpoe_tf.data.image_check import check_image_files, inspect_bytes
from balpoe_tf.data.augment import (cifar_augment, color_jitter, crop_flip_rotate,
                                    random_resized_crop)
from balpoe_tf.names import AUGMENTATIONS, IMAGE_AUGMENTATIONS, IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, TFDS_PREFIX
from balpoe_tf.data.sources import (CIFAR_MEAN, CIFAR_STD, DATASETS, extract_from_tfds, from_arrays, IDX_FILES,
                                    image_files, IMAGENET_MEAN, IMAGENET_STD, load_dataset, load_digits, load_idx,
                                    load_image_folder, load_image_list, load_npz, load_tfds, NPZ_KEYS, read_idx,
                                    read_image_list, TFDS_OPTIONS)
from balpoe_tf.data.pipelines import normalizer, steps_per_epoch, test_pipeline, train_pipeline

__all__ = ["class_counts", "DataError", "fingerprint", "check_image_files", "inspect_bytes",
           "MAX_IMAGE_PIXELS", "LabeledData", "Split", "STREAM_SHUFFLE_BUFFER", "TfdsStream", "class_groups",
           "class_prior", "FEW_SHOT_MAX", "hold_out", "HOLDOUT_SEED", "long_tailed_counts",
           "long_tailed_indices", "make_long_tailed", "MANY_SHOT_MIN", "PRIOR_FLOOR", "SAMPLING_SEED",
           "subsample", "decode_image", "decode_pixels", "decodes_as_pillow", "image_complete",
           "IMAGE_EXTENSIONS", "image_file_ok", "image_pixels", "resize_center_crop", "test_transform",
           "AUGMENTATIONS", "cifar_augment", "crop_flip_rotate", "color_jitter", "IMAGE_AUGMENTATIONS",
           "random_resized_crop", "CIFAR_MEAN", "CIFAR_STD", "DATASETS", "extract_from_tfds", "from_arrays",
           "IDX_FILES", "IMAGENET_MEAN", "IMAGENET_STD", "load_dataset", "load_digits", "load_idx",
           "image_files", "load_image_folder", "load_image_list", "load_npz", "load_tfds", "NPZ_KEYS", "read_idx",
           "read_image_list", "TFDS_OPTIONS", "TFDS_PREFIX", "normalizer", "steps_per_epoch", "test_pipeline",
           "train_pipeline"]
