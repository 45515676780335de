"""The settings of the tools besides training (tools/evaluate.py, predict.py, export.py,
reproduce.py): dataclasses whose fields are the tools' flags, checked when made. Like
`run_config.RunConfig`, they load without TensorFlow."""

import dataclasses
from typing import List

from balpoe_tf.config import (at_least, between, Check, config_field, each, greater_than, NON_EMPTY, one_of, refuse,
                              validate)
from balpoe_tf.names import (DEFAULT_ESTIMATOR, DEFAULT_SAFEGUARD_LEVEL, ESTIMATORS, IMAGE_EXTENSIONS,
                             MAX_IMAGE_PIXELS, METHODS, parse_distribution, PRIOR_MODES)
from balpoe_tf.precision import PRECISIONS


def prior_estimator_field():
    """--prior_estimator, of tools/evaluate.py and tools/predict.py alike."""
    return config_field(DEFAULT_ESTIMATOR, "How a test prior is estimated from unlabeled images: bcts_em (EM on "
                        "posteriors calibrated on the run's held-out split), ts_em, bbse (these three need a run "
                        "trained with --holdout_fraction; bcts_em also works from a SavedModel of one), map_em or "
                        "em (plain EM, uncalibrated). Without what it needs, plain EM stands in, with a warning.",
                        one_of(ESTIMATORS))


def prior_safeguard_field():
    """--prior_safeguard, of tools/evaluate.py and tools/predict.py alike."""
    return config_field(DEFAULT_SAFEGUARD_LEVEL, "Keep the model's own prior unless a likelihood-ratio test finds a "
                        "shift at this significance level (0: always use the estimate).",
                        between(0, 1, open_high=True))


def _is_distribution(name: str) -> bool:
    try:
        return parse_distribution(name)[1] >= 1
    except ValueError:
        return False


def _comma_list(check: Check) -> Check:
    """A comma-separated string whose items each follow `check`."""
    return Check(lambda v: bool(v.strip(",")) and all(check.ok(x) for x in v.split(",") if x),
                 f"a comma-separated list of {check.rule}")


@dataclasses.dataclass
class EvalConfig:
    """Settings of tools/evaluate.py (each field is a flag, checked when made)."""

    run_dir: str = config_field("", "Run folder(s) of tools/train.py, comma-separated; each is a table row "
                                    "group.", Check(lambda v: bool(v.strip(",")), "one or more run folders"))
    distributions: str = config_field(
        "all", "'all' or comma-separated names: uniform, forwardR, backwardR.",
        Check(lambda v: v == "all" or _comma_list(Check(_is_distribution, "")).ok(v),
              "'all' or a comma-separated list of uniform, forwardR, backwardR with R >= 1 (e.g. forward50)"))
    priors: str = config_field(",".join(PRIOR_MODES), "Comma-separated test-time prior modes.",
                               _comma_list(one_of(PRIOR_MODES)))
    output_dir: str = config_field("", "Where the reports go (default: RUN_DIR/evaluation of the first run).")
    prior_estimator: str = prior_estimator_field()
    compare_estimators: str = config_field("", "More estimators to measure beside --prior_estimator "
                                               "(comma-separated), as extra rows.",
                                           Check(lambda v: not v.strip(",") or _comma_list(
                                               one_of(ESTIMATORS)).ok(v),
                                                 "empty or a comma-separated list of " + ", ".join(ESTIMATORS)))
    prior_safeguard: float = prior_safeguard_field()
    batch_size: int = config_field(256, "Prediction batch size.", at_least(1))
    shift_list_dir: str = config_field("", "Folder of standard shifted-set list files ('path label' lines) "
                                     "named *_<distribution>.txt (e.g. ImageNet_LT_forward50.txt); "
                                     "without it the sets are built from the balanced test set.")
    data_dir: str = config_field("", "Override the run's --data_dir (TFDS data) on this machine.")
    data_path: str = config_field("", "Override the run's --data_path on this machine.")
    data_root: str = config_field("", "Override the run's --data_root on this machine.")
    progress_every: float = config_field(30.0, "Seconds between progress lines of a prediction when output is "
                                               "not a terminal (0: none); a terminal gets one updating line.",
                                         at_least(0))

    def __post_init__(self):
        validate(self)


@dataclasses.dataclass
class PredictConfig:
    """Settings of tools/predict.py (each field is a flag, checked when made)."""

    model: str = config_field("", "A run folder of tools/train.py, or an exported SavedModel: a version "
                                  "folder, or the export folder (its newest version).", NON_EMPTY)
    inputs: List[str] = config_field([], "Image files, folders (searched recursively for "
                                     f"{'/'.join(IMAGE_EXTENSIONS)}) and list files (.txt: one path "
                                     "per line, relative to the list's folder; anything after the path is "
                                     "ignored).", Check(bool, "one or more files, folders or list files"))
    top_k: int = config_field(5, "Classes shown per image (at most the class count).", at_least(1))
    prior: str = config_field("", "Deployment prior: counts or probabilities, one per class, as a comma list "
                                  "or a file of numbers (commas, spaces or new lines, or a JSON list).")
    estimate_prior: bool = config_field(False, "Estimate the label prior of the given images (with "
                                               "--prior_estimator) and apply it.")
    prior_estimator: str = prior_estimator_field()
    prior_safeguard: float = prior_safeguard_field()
    save_prior: str = config_field("", "Write the estimated (or given) prior to this JSON file: one probability "
                                       "per class, the list --prior and TF Serving's predict_calibrated_with_prior "
                                       "and predict_with_prior take.")
    output: str = config_field("", "Also write the predictions to this .csv or .json file.",
                               Check(lambda v: not v or v.lower().endswith((".csv", ".json")),
                                     "empty or a file name ending in .csv or .json"))
    bad_images: str = config_field("skip", "A file that cannot be read as an image: 'skip' it, naming it and "
                                           "why, or 'fail' at the first.", one_of(("skip", "fail")))
    batch_size: int = config_field(64, "Images per model call.", at_least(1))

    def __post_init__(self):
        validate(self)
        if self.prior and self.estimate_prior:
            refuse("estimate_prior", True, "false when --prior is given (one prior at a time)")
        if self.save_prior and not (self.prior or self.estimate_prior):
            refuse("save_prior", self.save_prior, "empty without --estimate_prior or --prior (no prior to save)")


@dataclasses.dataclass
class ExportConfig:
    """Settings of tools/export.py (each field is a flag)."""

    run_dir: str = config_field("", "Run folder of tools/train.py (its model.keras or last checkpoint).",
                                NON_EMPTY)
    export_dir: str = config_field("", "Where the versions go (default RUN_DIR/export).")
    top_k: int = config_field(5, "How many classes the top-k outputs hold (at most the class count).",
                              at_least(1))
    max_image_megapixels: float = config_field(MAX_IMAGE_PIXELS / 1e6, "Image-bytes signatures refuse "
                                               "larger images (read from the header, before decoding).",
                                               greater_than(0))
    precision: str = config_field("float32", "Precision the SavedModel computes in, whatever the run trained in. "
                                             "float32 serves well on any machine; a mixed precision can be faster "
                                             "only where the serving hardware computes it natively, and not "
                                             "always there (docs/performance.md). auto: the precision measured faster "
                                             "at prediction on this machine, for serving on machines like it.",
                                  one_of(("auto",) + PRECISIONS))

    def __post_init__(self):
        validate(self)


@dataclasses.dataclass
class ReproduceConfig:
    """Settings of tools/reproduce.py besides the BalPoE run's own flags (each a flag)."""

    methods: List[str] = config_field(["balpoe", "bs", "balpoe_no_mixup", "ce"], "Methods, trained in this "
                                      "order.", Check(lambda v: bool(v) and each(one_of(METHODS)).ok(v),
                                                      "a non-empty list of " + ", ".join(METHODS)))
    seeds: List[int] = config_field([1], "Run seeds (each method is trained once per seed).",
                                    Check(lambda v: bool(v) and each(at_least(0)).ok(v),
                                          "a non-empty list of seeds >= 0"))
    run_root: str = config_field("runs/reproduce", "Runs go to RUN_ROOT/seed<S>/<method>; the report to "
                                 "RUN_ROOT/reproduce.{md,json}. --output_dir is not used.", NON_EMPTY)
    train: bool = config_field(True, "Train (or resume) every run that has not finished; --notrain only "
                                     "writes the report of what exists.")
    title: str = config_field("", "Report title (default: dataset, imbalance ratio and epochs).")
    summary_json: str = config_field("", "Also write the title and the summary rows (one per run: balanced-test "
                                     "metrics in percent, epochs, seed, commit, wall-clock hours) to this JSON "
                                     "file, e.g. benchmarks/reproduce_<name>.json. An existing file of the same "
                                     "title is updated: its finished rows stay unless this report has that run "
                                     "finished too.")

    def __post_init__(self):
        validate(self)
