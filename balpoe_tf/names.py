"""The names (and limits) that settings are checked against, apart from the code behind them, so
that the settings of every tool load without TensorFlow. Each registry of the implementation
(backbones, data sources, augmentations, estimators, ...) is keyed by the names here
(tests/test_architecture.py checks that they agree)."""

# Backbones of `models.BACKBONES`.
BACKBONES = ("resnet32", "resnet20", "resnet8", "resnet50", "resnext50")

# Data sources of `data.DATASETS`, and the prefix of any TFDS dataset (tfds:NAME).
DATASETS = ("cifar10", "cifar100", "digits", "npz", "idx", "folder", "list")
TFDS_PREFIX = "tfds:"
# --backbone=hub:PRESET: a keras-hub preset (name or folder) as the network (`models.hub`).
HUB_PREFIX = "hub:"

# Training augmentations: those that crop full-size image files, then all.
IMAGE_AUGMENTATIONS = ("imagenet", "inat", "randaugment")
AUGMENTATIONS = ("cifar", "autoaugment", "crop_flip", "none") + IMAGE_AUGMENTATIONS

# Extensions an image folder is searched for; files TensorFlow does not decode (TIFF, WebP)
# are converted with Pillow by the check (`data.image_check`).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ico")

# Images above this many pixels are refused before decoding: decoding and resizing a
# 40-megapixel image takes about 1 GB (measured: 8000 x 8000 with a centre crop, 1.5 GB).
MAX_IMAGE_PIXELS = 40_000_000

# Test-time prior estimators of `label_shift`; those after "map_em" need the run's held-out split.
ESTIMATORS = ("em", "map_em", "bbse", "ts_em", "bcts_em")
NEEDS_HOLDOUT = ("bbse", "ts_em", "bcts_em")
DEFAULT_ESTIMATOR = "bcts_em"
# Significance level of the likelihood-ratio test that keeps the model's prior (0: no test).
DEFAULT_SAFEGUARD_LEVEL = 0.01

# Shifted test sets, in the paper's order: Forward 50 ... Forward 2, Uniform, Backward 2 ... Backward 50.
SHIFT_RATIOS = (50, 25, 10, 5, 2)
DISTRIBUTIONS = tuple([f"forward{r}" for r in SHIFT_RATIOS] + ["uniform"]
                      + [f"backward{r}" for r in reversed(SHIFT_RATIOS)])
PRIOR_MODES = ("none", "known", "estimated")

# Methods of the paper's comparison (tools/reproduce.py) -> (title in tables, baseline of
# `run_config.BASELINES` trained like the BalPoE run, None for BalPoE itself).
METHODS = {
    "balpoe": ("BalPoE", None),
    "bs": ("BS (lambda 0)", "bs"),
    "balpoe_no_mixup": ("BalPoE, no mixup", "erm"),
    "ce": ("CE", "ce"),
    "uniform": ("uniform ensemble", "uniform"),
}


def parse_distribution(name: str):
    """('forward' | 'backward' | 'uniform', ratio) of a distribution name like 'forward50'."""
    if name == "uniform":
        return "uniform", 1.0
    for direction in ("forward", "backward"):
        if name.startswith(direction) and name[len(direction):].replace(".", "", 1).isdigit():
            return direction, float(name[len(direction):])
    raise ValueError(f"unknown distribution {name!r}: use uniform, forwardR or backwardR (e.g. forward50)")
