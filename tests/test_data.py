import io
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from balpoe_tf import data as lt_data
from conftest import mock_imagenet_lt_records, synthetic_data


@pytest.mark.parametrize("num_classes,ir,size,head,tail", [
    (100, 100, 10847, 500, 5), (100, 50, 12608, 500, 10), (100, 10, 19573, 500, 50),
    (10, 100, 12406, 5000, 50), (10, 50, 13996, 5000, 100), (10, 10, 20431, 5000, 500),
])
def test_cifar_lt_sizes_match_reference(num_classes, ir, size, head, tail):
    counts = lt_data.long_tailed_counts(50000 // num_classes, num_classes, ir)
    assert counts.sum() == size
    assert counts[0] == head and counts[-1] == tail
    assert np.all(np.diff(counts) <= 0)


@pytest.mark.parametrize("ir,groups", [(100, (35, 35, 30)), (50, (41, 41, 18)), (10, (69, 31, 0))])
def test_cifar100_lt_groups(ir, groups):
    masks = lt_data.class_groups(lt_data.long_tailed_counts(500, 100, ir))
    assert tuple(int(masks[g].sum()) for g in ("many", "medium", "few")) == groups


def test_long_tailed_counts_by_hand():
    # 100 * 0.25^(i/2): 100, 50, 25
    np.testing.assert_array_equal(lt_data.long_tailed_counts(100, 3, 4), [100, 50, 25])
    np.testing.assert_array_equal(lt_data.long_tailed_counts(100, 3, 4, reverse=True), [25, 50, 100])
    np.testing.assert_array_equal(lt_data.long_tailed_counts(7, 1, 10), [7])
    # A non-integer ratio works; truncation, not rounding: 10 * (1/3)^(1/1) = 3.33 -> 3
    np.testing.assert_array_equal(lt_data.long_tailed_counts(10, 2, 3), [10, 3])


def test_imbalance_ratio_below_one_is_rejected():
    with pytest.raises(lt_data.DataError, match="imbalance ratio must be >= 1"):
        lt_data.long_tailed_counts(100, 10, 0.5)


def test_long_tailed_indices_are_seeded_and_per_class():
    labels = np.tile(np.arange(3), 10)  # 10 images per class, interleaved
    np.random.seed(123)  # the run's global seed must not matter
    first = lt_data.long_tailed_indices(labels, [4, 2, 1])
    np.random.seed(999)
    second = lt_data.long_tailed_indices(labels, [4, 2, 1])
    np.testing.assert_array_equal(first, second)
    # Same draws as shuffling each class's indices in order with one RandomState(0).
    rng, expected = np.random.RandomState(0), []
    for c, n in enumerate([4, 2, 1]):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        expected += list(idx[:n])
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(np.bincount(labels[first]), [4, 2, 1])


def test_make_long_tailed_applies_to_train_only():
    data = synthetic_data(num_classes=4, per_class=20, test_per_class=3)
    lt = lt_data.make_long_tailed(data, 10)
    # 20 * 0.1^(i/3): 20, 9, 4, 2
    np.testing.assert_array_equal(lt.train_counts(), [20, 9, 4, 2])
    assert len(lt.test) == len(data.test)
    assert lt.name == "synthetic-LT10"


def test_make_long_tailed_errors():
    data = synthetic_data(num_classes=3, per_class=5)
    with pytest.raises(lt_data.DataError, match="leaves class 2 .* with no images"):
        lt_data.make_long_tailed(data, 10)  # 5 * 0.1 = 0.5 -> 0
    empty = lt_data.from_arrays("gap", data.train.images[:10], data.train.labels[:10],
                                data.test.images, data.test.labels)
    with pytest.raises(lt_data.DataError, match="class 2 .* has no training images"):
        lt_data.make_long_tailed(empty, 2)


def test_prior_and_groups_by_hand():
    np.testing.assert_allclose(lt_data.class_prior([3, 1]), [0.75, 0.25])
    with pytest.raises(lt_data.DataError, match="class 1 has no training images"):
        lt_data.class_prior([3, 0])
    g = lt_data.class_groups([101, 100, 20, 19])
    np.testing.assert_array_equal(g["many"], [True, False, False, False])
    np.testing.assert_array_equal(g["medium"], [False, True, True, False])
    np.testing.assert_array_equal(g["few"], [False, False, False, True])


def test_label_out_of_range_is_rejected():
    with pytest.raises(lt_data.DataError, match="label 5 is outside \\[0, 3\\)"):
        lt_data.class_counts(np.array([0, 1, 5]), 3)
    x = np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(lt_data.DataError, match="test label 7 is outside"):
        lt_data.from_arrays("bad", x, [0, 1], x, [0, 7], class_names=["a", "b"])


def test_npz_source(tmp_path):
    data = synthetic_data()
    path = tmp_path / "d.npz"
    np.savez(path, x_train=data.train.images, y_train=data.train.labels,
             x_test=data.test.images, y_test=data.test.labels, class_names=np.array(list("abcd")))
    loaded = lt_data.load_dataset("npz", data_path=str(path))
    assert loaded.class_names == tuple("abcd")
    np.testing.assert_array_equal(loaded.train.images, data.train.images)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=data.train.images, y_train=data.train.labels)
    with pytest.raises(lt_data.DataError, match="lacks array\\(s\\) x_test, y_test"):
        lt_data.load_npz(str(bad))
    with pytest.raises(lt_data.DataError, match="does not exist"):
        lt_data.load_npz(str(tmp_path / "missing.npz"))


def test_npz_arrays_of_different_lengths_are_named(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=np.zeros((150, 4, 4), np.uint8), y_train=np.zeros(143, np.int64),
             x_test=np.zeros((2, 4, 4), np.uint8), y_test=np.zeros(2, np.int64))
    with pytest.raises(lt_data.DataError, match="mine.npz: x_train holds 150 images but y_train 143 labels"):
        lt_data.load_npz(str(path))


def test_npz_that_is_not_an_archive_is_named(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("x_train,y_train\n")
    with pytest.raises(lt_data.DataError, match=f"{text} is not an .npz archive \\(it starts with b'x_train,'"):
        lt_data.load_npz(str(text))
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))  # one .npy array under an .npz name
    with pytest.raises(lt_data.DataError, match="single.npz is not an .npz archive"):
        lt_data.load_npz(str(single))
    objects = tmp_path / "objects.npz"
    np.savez(objects, x_train=np.array([None, 1], dtype=object), y_train=[0], x_test=[0], y_test=[0])
    with pytest.raises(lt_data.DataError, match="objects.npz: an array cannot be read"):
        lt_data.load_npz(str(objects))


def test_float_images_are_refused_unless_whole_pixel_values(caplog):
    images = np.random.RandomState(0).randint(0, 256, (4, 8, 8, 3))
    labels = np.array([0, 1, 0, 1])
    with pytest.raises(lt_data.DataError, match=r"t x_train: images are float32 in \[0, 1\], but uint8 "
                                                r"pixels 0..255 are expected: save \(x \* 255\)"):
        lt_data.from_arrays("t", (images / 255.0).astype(np.float32), labels, images, labels)
    with pytest.raises(lt_data.DataError, match="t x_test: images are float64 with fractional values"):
        lt_data.from_arrays("t", images, labels, images + 0.5, labels)
    with pytest.raises(lt_data.DataError, match="NaN or infinite"):
        lt_data.from_arrays("t", images, labels, np.full(images.shape, np.nan), labels)
    with caplog.at_level("WARNING"):
        data = lt_data.from_arrays("t", images.astype(np.float64), labels, images.astype(np.int32), labels)
    assert data.train.images.dtype == np.uint8 and (data.train.images == images).all()
    assert "t x_train: float64 images hold whole numbers in [0, 255]; read as uint8 pixels" in caplog.text
    assert "x_test" not in caplog.text  # integer arrays are cast without a word
    with pytest.raises(lt_data.DataError, match=r"t y_train: labels must be integer class ids 0..C-1, got "
                                                r"dtype float64 with values such as \[0.5"):
        lt_data.from_arrays("t", images, labels + 0.5, images, labels)


def _write_png(path, colour, size=10):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = np.full((size, size, 3), colour, np.uint8)
    tf.io.write_file(str(path), tf.io.encode_png(image))


def test_image_folder_and_list_sources(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for c, name in enumerate(["cat", "dog"]):
            for i in range(n):
                _write_png(tmp_path / split / name / f"{i}.png", 100 * c)
    data = lt_data.load_dataset("folder", data_path=str(tmp_path), image_size=6)
    assert data.class_names == ("cat", "dog")
    np.testing.assert_array_equal(data.train_counts(), [3, 3])
    images, labels = next(iter(lt_data.test_pipeline(data, 8)))
    assert images.shape == (2, 6, 6, 3)
    # Pixels of the dog (value 100) after normalisation with the ImageNet statistics.
    expected = (100 / 255 - np.array(lt_data.IMAGENET_MEAN)) / np.array(lt_data.IMAGENET_STD)
    np.testing.assert_allclose(images[1, 0, 0], expected, rtol=1e-5)

    train_list = tmp_path / "train.txt"
    train_list.write_text("train/cat/0.png 0\ntrain/dog/0.png 1\n")
    test_list = tmp_path / "test.txt"
    test_list.write_text("test/cat/0.png 0\ntest/dog/0.png 3\n")
    with pytest.raises(lt_data.DataError, match="test label 3 is outside \\[0, 2\\)"):
        lt_data.load_image_list(str(train_list), str(test_list), str(tmp_path), num_classes=2)
    test_list.write_text("test/cat/9.png 0\n")
    with pytest.raises(lt_data.DataError, match="do not exist.*9.png"):
        lt_data.load_image_list(str(train_list), str(test_list), str(tmp_path))


def test_an_image_folder_reads_as_keras_and_torchvision_do_and_says_what_it_leaves(tmp_path):
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            _write_png(tmp_path / split / name / "0.png", 10)
    _write_png(tmp_path / "train" / "cat" / "indoor" / "deeper" / "1.png", 20)  # sub-folders are read
    from PIL import Image

    Image.fromarray(np.full((16, 16, 3), 30, np.uint8)).save(tmp_path / "train" / "cat" / "2.ICO", format="ICO")
    (tmp_path / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata
    (tmp_path / "train" / "dog" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "train" / "dog" / ".thumbnails").mkdir()
    _write_png(tmp_path / "train" / "dog" / ".thumbnails" / "0.png", 0)
    (tmp_path / "train" / "__MACOSX" / "cat").mkdir(parents=True)  # not a class
    (tmp_path / "train" / "dog" / "photo.heic").write_bytes(b"heic")
    (tmp_path / "train" / "dog" / "no_extension").write_bytes((tmp_path / "train" / "dog" / "0.png").read_bytes())
    data = lt_data.load_dataset("folder", data_path=str(tmp_path), image_size=6)
    assert data.class_names == ("cat", "dog")
    assert [os.path.relpath(p, tmp_path) for p in data.train.images] == [
        "train/cat/0.png", "train/cat/2.ICO", "train/cat/indoor/deeper/1.png", "train/dog/0.png"]
    assert sorted(os.path.relpath(p, tmp_path) for p in data.ignored_files) == [
        "train/cat/._0.png", "train/dog/.DS_Store", "train/dog/.thumbnails"]
    assert sorted(os.path.relpath(p, tmp_path) for p in data.skipped_files) == [
        "train/dog/no_extension", "train/dog/photo.heic"]
    assert lt_data.check_image_files(data).train_counts().tolist() == [3, 1]  # the ICO is read (through Pillow)


def test_an_empty_class_folder_is_named(tmp_path):
    _write_png(tmp_path / "train" / "cat" / "0.png", 10)
    (tmp_path / "train" / "dog" / "sub").mkdir(parents=True)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("no images here")
    _write_png(tmp_path / "test" / "cat" / "0.png", 10)
    with pytest.raises(lt_data.DataError, match=f"class folder\\(s\\) {tmp_path}/train/dog hold no image file "
                                                r"\(looked for .jpg, .*, in sub-folders too\): add images, or remove"):
        lt_data.load_dataset("folder", data_path=str(tmp_path), image_size=6)


@pytest.mark.slow
def test_tfds_cifar_with_mock_data():
    with tfds.testing.mock_data(num_examples=60):
        data = lt_data.load_dataset("cifar10", imbalance_ratio=2)
    assert data.image_shape == (32, 32, 3) and data.num_classes == 10
    assert data.mean == lt_data.CIFAR_MEAN
    counts = data.train_counts()
    assert counts[0] >= counts[-1] and counts[-1] >= 1


def test_tfds_not_available_offline_says_how_to_provide_it(tmp_path):
    with pytest.raises(lt_data.DataError, match="not available offline.*--data_dir.*npz.*folder"):
        lt_data.load_tfds("cifar10", data_dir=str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(lt_data.DataError, match="unknown dataset 'imagenet9'"):
        lt_data.load_dataset("imagenet9")


@pytest.mark.slow
def test_train_pipeline_epochs_are_seeded_permutations():
    data = synthetic_data(num_classes=3, per_class=5)  # 15 images
    ds = lt_data.train_pipeline(data, batch_size=4, epochs=2, seed=7, augment="none")
    batches = list(ds)
    assert len(batches) == 2 * lt_data.steps_per_epoch(15, 4)
    assert [len(b[1]) for b in batches[:4]] == [4, 4, 4, 3]
    epoch0 = np.concatenate([b[1] for b in batches[:4]])
    np.testing.assert_array_equal(np.sort(epoch0), np.sort(data.train.labels))
    again = list(lt_data.train_pipeline(data, 4, 2, seed=7, augment="cifar"))
    resumed = list(lt_data.train_pipeline(data, 4, 2, seed=7, augment="cifar", start_epoch=1))
    for a, b in zip(again[4:], resumed):
        np.testing.assert_array_equal(a[0], b[0])
    other = np.concatenate([b[1] for b in lt_data.train_pipeline(data, 4, 1, seed=8, augment="none")])
    assert not np.array_equal(epoch0, other)


def test_cifar_augment_without_rotation_is_a_padded_crop_and_flip():
    rng = np.random.RandomState(0)
    images = rng.randint(1, 256, size=(6, 8, 8, 1)).astype(np.float32)
    out = lt_data.cifar_augment(images, tf.constant([3, 4], tf.int64), pad=2, max_degrees=0.0).numpy()
    for src, dst in zip(images, out):
        padded = np.pad(src, ((2, 2), (2, 2), (0, 0)))
        candidates = [c[:, ::-1] if flip else c
                      for dy in range(5) for dx in range(5) for flip in (False, True)
                      for c in [padded[dy:dy + 8, dx:dx + 8]]]
        assert any(np.array_equal(dst, c) for c in candidates)


def test_cifar_augment_rotation_keeps_the_centre():
    image = np.zeros((1, 9, 9, 1), np.float32)
    image[0, 4, 4] = 1.0
    out = lt_data.cifar_augment(image, tf.constant([1, 2], tf.int64), pad=0, flip=False).numpy()
    assert out[0, 4, 4, 0] == 1.0 and out.sum() == 1.0


def test_crop_flip_rotate_is_torchvision_on_pillow():
    # The reference: pad with black, crop, mirror, then Pillow's rotate (what torchvision's
    # RandomCrop(padding=4), RandomHorizontalFlip and RandomRotation do), one image at a time.
    from PIL import Image

    rng = np.random.RandomState(0)
    n = 16
    images = rng.randint(1, 256, size=(n, 32, 32, 3)).astype(np.uint8)
    shift, mirror, degrees = rng.randint(-4, 5, size=(n, 2)), rng.rand(n) < 0.5, rng.uniform(-15, 15, n)
    out = lt_data.crop_flip_rotate(images, tf.constant(shift, tf.float32), tf.constant(mirror),
                                   tf.constant(degrees, tf.float32)).numpy()
    expected = []
    for image, (dx, dy), flip, angle in zip(images, shift, mirror, degrees):
        crop = np.pad(image, ((4, 4), (4, 4), (0, 0)))[4 + dy:36 + dy, 4 + dx:36 + dx]
        crop = np.ascontiguousarray(crop[:, ::-1] if flip else crop)
        expected.append(np.asarray(Image.fromarray(crop).rotate(angle, Image.NEAREST, fillcolor=0)))
    same = (out == np.stack(expected)).all(axis=-1)
    # Pillow and TensorFlow round a sampling point that falls exactly between two pixels apart.
    assert same.mean() > 0.999
    # Black where the rotation leaves the crop window, even over image content (the earlier
    # single warp filled those corners from the image: 14.0 % black against Pillow's 16.0 %).
    assert (out == 0).all(-1).sum() == pytest.approx((np.stack(expected) == 0).all(-1).sum(), abs=5)


def test_test_transform_resizes_and_centre_crops():
    image = np.arange(64 * 128 * 3, dtype=np.uint8).reshape(64, 128, 3)  # h 64, w 128
    png = tf.io.encode_png(image)
    # Shorter side 64 = 32 / 0.5: no resize, then the centre 32 x 32.
    out = lt_data.test_transform(png, (32, 32, 3), test_crop=0.5).numpy()
    np.testing.assert_array_equal(out, image[16:48, 48:80])
    assert lt_data.test_transform(png, (16, 16, 3)).shape == (16, 16, 3)  # whole image resized


def test_random_resized_crop_and_colour_jitter():
    image = tf.constant(np.random.RandomState(0).randint(0, 256, (50, 70, 3)), tf.float32)
    crop = lt_data.random_resized_crop(image, (24, 24), tf.constant([1, 2], tf.int64))
    assert crop.shape == (24, 24, 3)
    jittered = lt_data.color_jitter(image, tf.constant([3, 4], tf.int64)).numpy()
    assert jittered.min() >= 0 and jittered.max() <= 255 and not np.array_equal(jittered, image)
    grey = tf.fill([4, 4, 3], 100.0)  # a grey image keeps its colour under saturation changes
    out = lt_data.color_jitter(grey, tf.constant([5, 6], tf.int64)).numpy()
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-3)


def _list_with_a_bad_file(tmp_path):
    (tmp_path / "ok").mkdir()
    for i in range(3):
        tf.io.write_file(str(tmp_path / "ok" / f"{i}.jpg"), tf.io.encode_jpeg(np.full((20, 20, 3), 50 * i, np.uint8)))
    (tmp_path / "ok" / "broken.jpg").write_bytes(b"this is not a jpeg")
    lines = "ok/0.jpg 0\nok/1.jpg 1\nok/broken.jpg 0\nok/2.jpg 1\n"
    (tmp_path / "list.txt").write_text(lines)
    return lt_data.load_image_list(str(tmp_path / "list.txt"), str(tmp_path / "list.txt"), str(tmp_path),
                                   image_size=16)


def test_an_unchecked_file_that_is_not_an_image_fails_with_its_path(tmp_path):
    data = _list_with_a_bad_file(tmp_path)  # not checked (data.check_image_files): the pipeline names it
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG/PNG/GIF/BMP image.*broken.jpg"):
        list(lt_data.test_pipeline(data, 4))
    checked = lt_data.check_image_files(data, "skip")
    assert sum(len(b[1]) for b in lt_data.test_pipeline(checked, 4)) == 3


def test_jpeg_decoded_as_pillow_decodes_it():
    from PIL import Image

    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 256, (32, 32, 3)).astype(np.uint8)
    jpeg = tf.io.encode_jpeg(pixels, quality=75).numpy()
    pillow = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    ours = lt_data.decode_pixels(tf.constant(jpeg), 3).numpy()
    np.testing.assert_array_equal(ours, pillow)
    assert np.abs(tf.io.decode_jpeg(jpeg).numpy().astype(int) - pillow).max() > 0  # TF's default IDCT is not
    np.testing.assert_array_equal(lt_data.decode_image(tf.constant(jpeg), (32, 32, 3)).numpy(), pillow)
    png = tf.io.encode_png(pixels).numpy()  # not a JPEG: decoded as it is
    np.testing.assert_array_equal(lt_data.decode_pixels(tf.constant(png), 3).numpy(), pixels)


def test_image_file_augmentations():
    data = synthetic_data()
    with pytest.raises(lt_data.DataError, match="--augment=imagenet crops full-size image files"):
        lt_data.train_pipeline(data, 4, 1, augment="imagenet")


def test_normalisation_and_test_crop_overrides():
    data = lt_data.load_dataset("digits", mean=[0.5], std=[0.25])
    assert data.mean == (0.5,) and data.std == (0.25,)
    with pytest.raises(lt_data.DataError, match="need 1 values each"):
        lt_data.load_dataset("digits", mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
    with pytest.raises(lt_data.DataError, match="--test_crop must be in \\(0, 1\\]"):
        lt_data.load_dataset("digits", test_crop=1.5)


def test_extract_imagenet_lt_images_from_tfds(tmp_path):
    jpegs = {f"n0{c}_{i}.JPEG": tf.io.encode_jpeg(np.full((12, 12, 3), 40 * c + i, np.uint8)).numpy()
             for c in range(2) for i in range(3)}
    (tmp_path / "train.txt").write_text("train/n00/n00_0.JPEG 0\ntrain/n01/n01_1.JPEG 1\n")
    (tmp_path / "test.txt").write_text("val/n01/n01_2.JPEG 1\n")

    def as_dataset(self, split, decoders=None, **kwargs):
        names = sorted(jpegs)
        return tf.data.Dataset.from_tensor_slices({
            "file_name": names, "image": [jpegs[n] for n in names], "label": [int(n[2]) for n in names]})

    root = tmp_path / "images"
    lists = [str(tmp_path / "train.txt"), str(tmp_path / "test.txt")]
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        assert lt_data.extract_from_tfds(lists, str(root)) == 3
        assert lt_data.extract_from_tfds(lists, str(root)) == 0  # already there
    assert (root / "val" / "n01" / "n01_2.JPEG").read_bytes() == jpegs["n01_2.JPEG"]
    data = lt_data.load_image_list(*lists, str(root))
    np.testing.assert_array_equal(data.train_counts(), [1, 1])
    (tmp_path / "test.txt").write_text("val/n05/n05_0.JPEG 1\n")
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        with pytest.raises(lt_data.DataError, match="1 listed image\\(s\\) are not in TFDS 'imagenet2012'"):
            lt_data.extract_from_tfds(lists, str(root))


def test_extract_without_prepared_tfds_says_how(tmp_path):
    (tmp_path / "train.txt").write_text("train/n00/x.JPEG 0\n")
    with pytest.raises(lt_data.DataError, match="not prepared.*downloads/manual.*tfds build imagenet2012"):
        lt_data.extract_from_tfds([str(tmp_path / "train.txt")], str(tmp_path), data_dir=str(tmp_path / "tfds"))


def _write_idx(path, array):
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_source(tmp_path):
    rng = np.random.RandomState(0)
    x_train, y_train = rng.randint(0, 256, (30, 6, 6)), np.repeat(np.arange(3), 10)
    x_test, y_test = rng.randint(0, 256, (6, 6, 6)), np.repeat(np.arange(3), 2)
    for name, array in zip(lt_data.IDX_FILES, (x_train, y_train, x_test, y_test)):
        _write_idx(tmp_path / f"{name}.gz", array)
    data = lt_data.load_dataset("idx", imbalance_ratio=5, data_path=str(tmp_path))
    assert data.image_shape == (6, 6, 1)
    np.testing.assert_array_equal(data.train_counts(), [10, 4, 2])  # 10 * 0.2^(i/2)
    np.testing.assert_array_equal(data.test.images[..., 0], x_test)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(lt_data.DataError, match="lacks t10k-labels-idx1-ubyte"):
        lt_data.load_idx(str(tmp_path))
    (tmp_path / "bad").write_bytes(b"\x00\x01\x08\x01")
    with pytest.raises(lt_data.DataError, match="not an unsigned-byte IDX file"):
        lt_data.read_idx(str(tmp_path / "bad"))


@pytest.mark.slow
def test_tfds_imagenet_lt_streams_its_three_splits():
    with tfds.testing.mock_data(as_dataset_fn=mock_imagenet_lt_records, policy=tfds.testing.MockPolicy.USE_CODE):
        data = lt_data.load_dataset("tfds:imagenet_lt", image_size=16, test_crop=0.875)
        validation = lt_data.load_dataset("tfds:imagenet_lt", split_test="validation", image_size=16)
        full = lt_data.train_pipeline(data, 64, epochs=2, seed=3, augment="imagenet")
        batches = list(full.as_numpy_iterator())
        resumed = list(lt_data.train_pipeline(data, 64, epochs=2, seed=3, augment="imagenet",
                                              start_epoch=1).as_numpy_iterator())
        test_labels = np.concatenate([y for _, y in lt_data.test_pipeline(data, 7).as_numpy_iterator()])
    assert data.train.stream is not None and data.train.stream.split == "train"
    assert (len(data.train), len(data.test), len(validation.test), data.num_classes) == (2000, 30, 20, 1000)
    assert (data.train_counts() == 2).all() and data.image_shape == (16, 16, 3)
    steps = lt_data.steps_per_epoch(2000, 64)
    assert len(batches) == 2 * steps and batches[0][0].shape == (64, 16, 16, 3)
    epoch = np.concatenate([y for _, y in batches[:steps]])
    assert sorted(epoch.tolist()) == sorted(data.train.labels.tolist())  # every record once per epoch
    assert not np.array_equal(epoch, data.train.labels)  # shuffled
    assert len(resumed) == steps
    for (x, y), (rx, ry) in zip(batches[steps:], resumed):  # a resumed run sees what an uninterrupted one did
        np.testing.assert_array_equal(y, ry)
        np.testing.assert_array_equal(x, rx)
    np.testing.assert_array_equal(test_labels, data.test.labels)  # the test split in its order


@pytest.mark.slow
def test_tfds_balanced_dataset_streamed_long_tailed():
    with tfds.testing.mock_data(num_examples=200):
        in_memory = lt_data.load_dataset("tfds:mnist", imbalance_ratio=2)
        data = lt_data.load_dataset("tfds:mnist", imbalance_ratio=2, in_memory="no", image_size=28)
        labels = np.concatenate([y for _, y in lt_data.train_pipeline(data, 32, epochs=1, seed=0, augment="none")
                                 .as_numpy_iterator()])
    assert in_memory.train.stream is None and in_memory.image_shape == (28, 28, 1)
    assert data.train.stream is not None and data.image_shape == (28, 28, 1)
    np.testing.assert_array_equal(data.train_counts(), in_memory.train_counts())  # the same sampling
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), data.train_counts())


def test_tfds_errors_name_the_fix(tmp_path):
    with pytest.raises(lt_data.DataError, match=f"not available offline in {tmp_path}.*`tfds build imagenet_lt "
                                                f"--data_dir={tmp_path} --manual_dir=MANUAL`"):
        lt_data.load_dataset("tfds:imagenet_lt", data_dir=str(tmp_path))
    with pytest.raises(lt_data.DataError, match="TFDS has no dataset 'no_such_set'"):
        lt_data.load_dataset("tfds:no_such_set", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=20):
        with pytest.raises(lt_data.DataError, match="--tfds_label_key=colour: the dataset has no such feature"):
            lt_data.load_dataset("tfds:mnist", label_key="colour")


def test_hold_out_sets_aside_a_fixed_share_of_each_class():
    labels = np.repeat(np.arange(4), [20, 10, 1, 2])
    data = lt_data.from_arrays("held", np.zeros((33, 4, 4, 3), np.uint8), labels,
                               np.zeros((4, 4, 4, 3), np.uint8), np.arange(4))
    held = lt_data.hold_out(data, 0.1)
    # round(0.1 n) and at least one, but never a class's last image: 2, 1, 0, 1.
    np.testing.assert_array_equal(np.bincount(held.holdout.labels, minlength=4), [2, 1, 0, 1])
    np.testing.assert_array_equal(held.train_counts(), [18, 9, 1, 1])
    again = lt_data.hold_out(data, 0.1)
    np.testing.assert_array_equal(again.holdout.labels, held.holdout.labels)
    with pytest.raises(lt_data.DataError, match=r"held-out fraction must be in \(0, 1\)"):
        lt_data.hold_out(data, 1.0)
