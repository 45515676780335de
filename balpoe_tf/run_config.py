"""The settings of a training run: `RunConfig` (each field a flag of tools/train.py, so flag
files in `configs/` set exactly these names) and the baselines. Loads without TensorFlow."""

import dataclasses
import os
from typing import List

from balpoe_tf import names
from balpoe_tf.config import (at_least, between, Check, config_field, each, either, FINITE, greater_than,
                              invalid_fields, NON_EMPTY, one_of, problem, RunError, validate)
from balpoe_tf.precision import MIN_SPEEDUP, PRECISIONS


# A quick run trains on at most this many batches per epoch and tests on at most this many.
QUICK_BATCHES = 5

# Baselines in the same code: name -> overrides.
BASELINES = {
    "ce": dict(num_experts=1, lambdas=[1.0], target_mean_lambda=1.0, mixup_alpha=0.0),
    "bs": dict(num_experts=1, lambdas=[0.0], target_mean_lambda=0.0, mixup_alpha=0.0),
    "erm": dict(mixup_alpha=0.0),
    "uniform": dict(lambdas=None),  # M experts, all lambda = 0
}


STRATEGIES = ("auto", "mirrored", "multi_worker", "none")


SCHEDULES = ("step", "cosine")


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a training run (each field is a flag of tools/train.py).

    Making one checks every value against its rule and the settings against each other
    (`ConfigError` names the flag, its value and what it may be)."""

    # The groups of tools/train.py --help: title and first field.
    FLAG_GROUPS = (("Run folder", "output_dir"), ("Data", "dataset"), ("Model", "backbone"),
                   ("Optimisation", "epochs"), ("Run control", "eval_every"))

    output_dir: str = config_field("runs/demo", "Run folder: flags, checkpoints, TensorBoard logs, results.",
                                   NON_EMPTY)
    # Data.
    dataset: str = config_field("digits", "Data source: a name, or tfds:NAME for any TFDS image-classification "
                                          "dataset (e.g. tfds:imagenet_lt).",
                                Check(lambda v: v in names.DATASETS or (v.startswith(names.TFDS_PREFIX)
                                                                        and len(v) > len(names.TFDS_PREFIX)),
                                      "one of " + ", ".join(sorted(names.DATASETS)) + " or tfds:NAME"))
    data_dir: str = config_field("", "TFDS data_dir holding prepared datasets (default ~/tensorflow_datasets).")
    tfds_split_train: str = config_field("train", "--dataset=tfds:NAME: the training split (slices work: "
                                                  "train[:90%]).", NON_EMPTY)
    tfds_split_test: str = config_field("test", "--dataset=tfds:NAME: the (balanced) test split.", NON_EMPTY)
    tfds_image_key: str = config_field("", "--dataset=tfds:NAME: the image feature (default: the Image one).")
    tfds_label_key: str = config_field("", "--dataset=tfds:NAME: the label feature (default: 'label', or the "
                                           "ClassLabel one).")
    tfds_in_memory: str = config_field("auto", "--dataset=tfds:NAME: load the images into memory (auto: when "
                                               "they have one fixed shape, e.g. CIFAR) or stream them from "
                                               "TFDS's files.", one_of(("auto", "yes", "no")))
    download: bool = config_field(False, "Let TFDS download the dataset (needs internet).")
    data_path: str = config_field("", "The .npz file (--dataset=npz) or image folder (--dataset=folder).")
    train_list: str = config_field("", "'path label' list of training images (--dataset=list).")
    test_list: str = config_field("", "'path label' list of test images (--dataset=list).")
    data_root: str = config_field("", "Folder the list-file paths are relative to.")
    num_classes: int = config_field(0, "Number of classes for --dataset=list (0: largest label + 1).",
                                    at_least(0))
    image_size: int = config_field(32, "Side of the model input for image files.", at_least(8))
    tfds_images: str = config_field("", "With --dataset=list: take the listed images missing under "
                                        "--data_root from this prepared TFDS dataset (imagenet2012, in "
                                        "--data_dir) and write them there first.")
    imbalance_ratio: float = config_field(100.0, "Head/tail ratio of the long-tailed training split; "
                                           "0 keeps the source's own class counts.",
                                          either(0, at_least(1), "the source's own counts"))
    augment: str = config_field("cifar", "Training augmentation.", one_of(names.AUGMENTATIONS))
    mean: List[float] = config_field([], "Per-channel normalisation mean in [0, 1] (default: the source's).",
                                     each(between(0, 1)))
    std: List[float] = config_field([], "Per-channel normalisation std in [0, 1] (default: the source's).",
                                    each(Check(lambda v: 0 < v <= 1, "in (0, 1]")))
    test_crop: float = config_field(0.0, "Image files: test resize to size/test_crop, centre crop (0.875); "
                                         "0 resizes the whole image.",
                                    either(0, Check(lambda v: 0 < v <= 1, "in (0, 1]"), "off"))
    holdout_fraction: float = config_field(0.0, "Share of each class's training images set aside (never trained "
                                                "on) to calibrate the ensemble for test-time prior estimation "
                                                "(0: none, as in the paper).", between(0, 0.5, open_high=True))
    bad_images: str = config_field("fail", "Image files that cannot be used (empty, not an image, truncated or "
                                           "damaged, over 40 megapixels), all found before training: 'fail' "
                                           "naming them, or 'skip' them (listed in the log and config.json; class "
                                           "counts and the prior are those of the images used).",
                                   one_of(("fail", "skip")))
    # Model.
    backbone: str = config_field("resnet32", "Backbone: one of this project's, or hub:PRESET, a keras-hub preset "
                                             "(a name, or a folder written by save_to_preset) with its weights; "
                                             "needs pip install -e \".[hub]\".",
                                 Check(lambda v: v in names.BACKBONES or (v.startswith(names.HUB_PREFIX)
                                                                          and len(v) > len(names.HUB_PREFIX)),
                                       "one of " + ", ".join(sorted(names.BACKBONES)) + " or hub:PRESET"))
    num_experts: int = config_field(3, "Number of experts M.", at_least(1))
    lambdas: List[float] = config_field([1.0, 0.0, -1.0], "One lambda per expert (tau = 1 - lambda).",
                                        each(FINITE))
    target_mean_lambda: float = config_field(0.0, "Mean lambda the ensemble should have (0: balanced); "
                                            "a different mean of --lambdas warns.", FINITE)
    scale: float = config_field(30.0, "Cosine-classifier scale (30 in the official code, 32 in the paper).",
                                greater_than(0))
    precision: str = config_field("auto", "Compute precision (the classifier and the loss stay float32). auto: "
                                          "float32, or a mixed precision the hardware computes natively (bfloat16 "
                                          "on a CPU with AVX512-BF16 or AMX; bfloat16 or float16 on recent GPUs) "
                                          f"where a few timed training steps of this model show it at least "
                                          f"{MIN_SPEEDUP:.2f}x as fast (measured once per machine and model, "
                                          "cached); a resumed run keeps the precision it started with.",
                                  one_of(("auto",) + PRECISIONS))
    strategy: str = config_field("auto", "tf.distribute strategy: auto (MirroredStrategy over all GPUs "
                                         "when there are several), mirrored, multi_worker (from TF_CONFIG) "
                                         "or none.", one_of(STRATEGIES))
    sync_bn: bool = config_field(False, "Synchronise batch-norm statistics across replicas.")
    init_from: str = config_field("", "Start from a trained network instead of random weights: a run folder or "
                                      ".keras file of tools/train.py, or a .weights.h5 file of a BalPoE network, "
                                      "with the same --backbone; with --backbone=resnet50 also a keras-hub "
                                      "preset (name or folder) or a plain keras-hub ResNet-50 file. Its trunk and "
                                      "experts' stages are loaded where the shapes match; the classifiers are "
                                      "always new.")
    # Optimisation.
    epochs: int = config_field(200, "Training epochs.", at_least(1))
    batch_size: int = config_field(128, "Global batch size.", at_least(1))
    lr: float = config_field(0.1, "Base learning rate.", greater_than(0))
    schedule: str = config_field("step", "LR schedule, stepped per epoch: 'step' (warm-up, x gamma at "
                                    "--milestones) or 'cosine' (to 0 at --epochs).", one_of(SCHEDULES))
    warmup_epochs: int = config_field(5, "Linear warm-up epochs (at most --epochs).", at_least(0))
    milestones: List[int] = config_field([160, 180], "Epochs (0-based, increasing, below --epochs) at which "
                                                     "'step' multiplies the LR by --gamma.", each(at_least(0)))
    gamma: float = config_field(0.1, "LR decay factor of 'step'.", greater_than(0))
    weight_decay: float = config_field(5e-4, "L2 weight decay (added to the gradient before momentum).",
                                       at_least(0))
    momentum: float = config_field(0.9, "SGD momentum.", between(0, 1, open_high=True))
    nesterov: bool = config_field(True, "Nesterov momentum (needs --momentum > 0).")
    pretrained_lr_factor: float = config_field(1.0, "With --init_from or a hub: backbone: the learning rate "
                                                    "of the pretrained weights is --lr times this (the "
                                                    "classifiers and anything new train at --lr).", at_least(0))
    frozen_epochs: int = config_field(0, "With --init_from or a hub: backbone: the pretrained weights are not "
                                         "updated during this many epochs at the start (the classifiers train "
                                         "alone).", at_least(0))
    mixup_alpha: float = config_field(0.4, "Mixup Beta(alpha, alpha); 0 trains without mixup.",
                                      either(0, greater_than(0), "no mixup"))
    seed: int = config_field(1, "Seed of initialisation, shuffling, augmentation and mixup.", at_least(0))
    deterministic: bool = config_field(False, "Enable TensorFlow op determinism (same seed, same weights).")
    jit_compile: bool = config_field(False, "Compile the train step with XLA (slower on CPU; measured).")
    # Run control.
    eval_every: int = config_field(10, "Evaluate on the test set every N epochs (and at the end).", at_least(1))
    checkpoint_every: int = config_field(10, "Save a checkpoint every N epochs (and at the end).", at_least(1))
    checkpoint_every_minutes: float = config_field(10.0, "Inside an epoch, save a checkpoint (with the step it "
                                                         "stopped at) every N minutes of training: a crash or kill "
                                                         "-9 loses at most that (0: only at epoch ends). SIGTERM and "
                                                         "Ctrl-C always save where the run is.", at_least(0))
    keep_checkpoints: int = config_field(2, "How many of the newest checkpoints stay (the newest always does).",
                                         at_least(1))
    compare: List[str] = config_field([], "Baselines to train after this run with the same data and "
                                      "schedule, and to put in the result table.", each(one_of(BASELINES)))
    dry_run: bool = config_field(False, "Build data and model, run one training step and one test batch, exit.")
    quick: bool = config_field(False, "Check this flag file end to end in minutes, in OUTPUT_DIR/quick: 2 epochs "
                                      f"of at most {QUICK_BATCHES} batches, at most {QUICK_BATCHES} test batches, "
                                      "no warm-up or LR steps, no baselines.")
    export: bool = config_field(True, "At the end, export a TF Serving SavedModel to RUN/export/<version>.")
    progress_every: float = config_field(30.0, "Inside an epoch or evaluation, seconds between progress lines "
                                               "when output is not a terminal (0: none); a terminal gets one "
                                               "updating line.", at_least(0))

    def __post_init__(self):
        problems, fixes = [], []
        invalid = invalid_fields(self)  # reported alone: what contradicts them would only repeat them
        if len(self.lambdas) != self.num_experts and "num_experts" not in invalid:
            problems.append(problem("lambdas", self.lambdas, f"one value per expert: {self.num_experts} for "
                                    f"--num_experts={self.num_experts}"))
        if not self.quick and not invalid & {"epochs", "warmup_epochs", "milestones"}:
            # (a quick run drops the warm-up and the LR steps)
            if self.warmup_epochs > self.epochs:
                problems.append(problem("warmup_epochs", self.warmup_epochs, f"at most --epochs={self.epochs}"))
                fixes.append(f"--warmup_epochs={self.epochs // 2}")
            below = sorted({m for m in self.milestones if 0 <= m < self.epochs})
            if self.schedule == "step" and below != self.milestones:
                problems.append(problem("milestones", self.milestones,
                                        f"strictly increasing epochs below --epochs={self.epochs}"))
                fixes.append(f"--milestones={','.join(map(str, below))}")
        if not self.init_from and not self.backbone.startswith(names.HUB_PREFIX):
            unused = [(name, default) for name, default in (("pretrained_lr_factor", 1.0), ("frozen_epochs", 0))
                      if getattr(self, name) != default and name not in invalid]
            problems += [problem(name, getattr(self, name), f"{default} without --init_from or a hub: backbone "
                                 "(nothing is pretrained)") for name, default in unused]
            fixes += ["--init_from=RUN_FOLDER"] if unused else []
        elif self.frozen_epochs >= self.epochs and not invalid & {"frozen_epochs", "epochs"}:
            problems.append(problem("frozen_epochs", self.frozen_epochs, f"below --epochs={self.epochs} (the "
                                    "pretrained weights would never train)"))
            fixes.append(f"--frozen_epochs={self.epochs // 10}")
        if self.nesterov and self.momentum == 0 and "momentum" not in invalid:
            problems.append(problem("momentum", self.momentum, "> 0 with --nesterov (or pass --nonesterov)"))
            fixes.append("--nonesterov")
        validate(self, problems, fixes)


# Settings that do not change what a run computes, so a resumed run may differ in them.
RUN_CONTROL = ("output_dir", "eval_every", "checkpoint_every", "checkpoint_every_minutes", "keep_checkpoints",
               "compare", "dry_run", "export", "progress_every", "data_dir", "tfds_images", "download", "data_path",
               "train_list", "test_list", "data_root", "jit_compile")


def baseline_config(config: RunConfig, name: str) -> RunConfig:
    """The config of baseline `name` trained like `config`, in a sub-folder of its run."""
    if name not in BASELINES:
        raise RunError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    overrides = dict(BASELINES[name])
    if overrides.get("lambdas", 1) is None:
        overrides["lambdas"] = [0.0] * config.num_experts
    return dataclasses.replace(config, output_dir=os.path.join(config.output_dir, f"baseline_{name}"),
                               compare=[], **overrides)


def test_batch_size(config: RunConfig) -> int:
    """The batch of a run's evaluations: its training batch, at least 256."""
    return max(config.batch_size, 256)


def quick_config(config: RunConfig) -> RunConfig:
    """The settings a run trains with: with --quick, at most 2 epochs, no warm-up, no LR steps,
    an evaluation and a checkpoint every epoch, and no baselines (the data is cut by
    `load_data`); without it, `config` as it is."""
    if not config.quick:
        return config
    return dataclasses.replace(config, epochs=min(config.epochs, 2), warmup_epochs=0, milestones=[], compare=[],
                               eval_every=1, checkpoint_every=1)


def config_to_flags(config: RunConfig) -> str:
    lines = []
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = str(value).lower()
        lines.append(f"--{key}={value}")
    return "\n".join(lines) + "\n"
