"""The data a run's settings name: loaded from its source, made long-tailed, its held-out split
set aside, its image files checked."""

from typing import Optional, Sequence

from balpoe_tf import data as lt_data
from balpoe_tf.config import RunError
from balpoe_tf.run_config import QUICK_BATCHES, RunConfig, test_batch_size


def load_data(config: RunConfig, image_record: Optional[str] = None,
              splits: Sequence[str] = ("train", "holdout", "test")) -> lt_data.LabeledData:
    """The data a run config names, long-tailed, with its held-out split and its image files
    checked (`data.check_image_files`).

    Args:
        config: the run settings.
        image_record: the folder where the checked files are recorded (a resumed run or an
            evaluation then checks only changed files); None keeps no record.
        splits: the splits whose image files are checked.
    """
    if config.tfds_images:
        if config.dataset != "list":
            raise RunError("--tfds_images goes with --dataset=list (the lists name the images to take)")
        lt_data.extract_from_tfds([config.train_list, config.test_list], config.data_root,
                                  config.tfds_images, config.data_dir or None)
    data = lt_data.load_dataset(
        config.dataset, imbalance_ratio=config.imbalance_ratio or None, data_dir=config.data_dir or None,
        download=config.download, data_path=config.data_path, train_list=config.train_list,
        test_list=config.test_list, data_root=config.data_root,
        num_classes=config.num_classes or None, image_size=config.image_size,
        mean=config.mean or None, std=config.std or None, test_crop=config.test_crop,
        split_train=config.tfds_split_train, split_test=config.tfds_split_test, image_key=config.tfds_image_key,
        label_key=config.tfds_label_key, in_memory=config.tfds_in_memory)
    if config.holdout_fraction:
        data = lt_data.hold_out(data, config.holdout_fraction)
    if config.quick:
        data = lt_data.subsample(data, QUICK_BATCHES * config.batch_size, QUICK_BATCHES * test_batch_size(config))
    return lt_data.check_image_files(data, config.bad_images, image_record, splits)
