"""data.image_check on the generated corpus: every file Pillow reads is read with Pillow's pixels,
every other one is named before any work; the record spares a second check."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from balpoe_tf import data as lt_data
from balpoe_tf.data import image_check
from image_corpus import corpus, write_corpus

GOOD = "rgb.jpg"


def _folder(root, train_a=None):
    """`root/{train,test}/{a,b}`: the whole corpus (or `train_a`) in train/a, one good JPEG
    in each other folder."""
    for split, cls in (("train", "a"), ("train", "b"), ("test", "a"), ("test", "b")):
        (root / split / cls).mkdir(parents=True)
    kinds = write_corpus(root / "train" / "a", train_a)
    for split, cls in (("train", "b"), ("test", "a"), ("test", "b")):
        write_corpus(root / split / cls, [GOOD])
    return kinds


def _pixels(path, channels=3):
    return lt_data.decode_pixels(tf.io.read_file(path), channels).numpy()


def test_every_file_pillow_reads_is_read_as_pillow_reads_it_and_every_other_is_named(tmp_path):
    kinds = _folder(tmp_path)
    loaded = lt_data.load_image_folder(str(tmp_path))
    data = lt_data.check_image_files(loaded, "skip", str(tmp_path / "record"))
    left_out = dict(data.left_out)
    # What the pipelines read for each file kept: the file itself, or the PNG it was converted to.
    read = dict(zip([str(p) for p in loaded.train.images if str(p) not in left_out], data.train.images))
    for name, kind in kinds.items():
        path = str(tmp_path / "train" / "a" / name)
        if kind.pixels is None:
            assert kind.problem in left_out[path], (name, left_out.get(path))
            continue
        assert path not in left_out, (name, left_out[path])
        np.testing.assert_array_equal(_pixels(read[path]), kind.pixels, err_msg=name)
    converted = {name for name in kinds if "converted" in read.get(str(tmp_path / "train" / "a" / name), "")}
    assert converted == {"palette.bmp", "scan.tif"}  # misread by TensorFlow, or not decoded by it
    # Class counts are those of the images used.
    assert data.train_counts().tolist() == [sum(k.pixels is not None for k in kinds.values()), 1]


def test_a_grey_model_reads_grey_pixels(tmp_path):
    for name, (contents, kind) in corpus().items():
        if kind.pixels is None or name == "huge.png":
            continue
        reason, usable = lt_data.inspect_bytes(contents, channels=1)
        grey = lt_data.decode_pixels(tf.constant(usable), 1).numpy()
        assert not reason and grey.shape == kind.pixels.shape[:2] + (1,), name


def test_bad_files_are_refused_before_any_work_listing_the_first_twenty(tmp_path):
    _folder(tmp_path, [GOOD])
    for i in range(23):
        (tmp_path / "train" / "a" / f"bad{i:02d}.jpg").write_bytes(b"")
    data = lt_data.load_image_folder(str(tmp_path))
    with pytest.raises(lt_data.DataError) as error:
        lt_data.check_image_files(data, "fail", str(tmp_path / "record"))
    message = str(error.value)
    assert message.startswith("23 image file(s) cannot be used:\n")
    assert f"{tmp_path / 'train' / 'a' / 'bad00.jpg'}: empty file (0 bytes)" in message
    assert "bad19.jpg" in message and "bad20.jpg" not in message and "... and 3 more" in message
    assert "--bad_images=skip" in message
    assert not (tmp_path / "record").exists()  # nothing is left behind


def test_a_class_left_without_images_is_named(tmp_path):
    _folder(tmp_path, [GOOD])
    (tmp_path / "train" / "b" / GOOD).write_bytes(b"not an image")
    with pytest.raises(lt_data.DataError, match="class 'b' has no train images left"):
        lt_data.check_image_files(lt_data.load_image_folder(str(tmp_path)), "skip")


def test_the_record_spares_a_second_check_of_unchanged_files(tmp_path, monkeypatch):
    _folder(tmp_path, [GOOD, "palette.bmp", "text.jpg"])
    data = lt_data.load_image_folder(str(tmp_path))
    record = str(tmp_path / "record")
    first = lt_data.check_image_files(data, "skip", record)
    saved = json.loads((tmp_path / "record" / image_check.RECORD_FILE).read_text())
    assert len(saved["files"]) == 6 and (tmp_path / "record" / image_check.CONVERTED_FOLDER).is_dir()

    def no_decoding(paths, channels, max_pixels):
        raise AssertionError(f"checked again: {paths}")

    monkeypatch.setattr(image_check, "_tensorflow_pass", no_decoding)
    again = lt_data.check_image_files(data, "skip", record)
    assert again.left_out == first.left_out and again.train.images.tolist() == first.train.images.tolist()
    assert lt_data.fingerprint(again.train) == lt_data.fingerprint(first.train)
    # A changed file is checked again, and the fingerprint tells the data apart.
    (tmp_path / "train" / "b" / GOOD).write_bytes((tmp_path / "train" / "a" / GOOD).read_bytes() + b"\0")
    with pytest.raises(AssertionError, match="checked again"):
        lt_data.check_image_files(data, "skip", record)
    monkeypatch.undo()
    changed = lt_data.check_image_files(data, "skip", record)
    assert lt_data.fingerprint(changed.train) != lt_data.fingerprint(first.train)
    assert lt_data.fingerprint(changed.test) == lt_data.fingerprint(first.test)


def test_list_files_are_checked_like_folders(tmp_path):
    kinds = write_corpus(tmp_path, ["rgb.png", "truncated_small.jpg", "palette.bmp"])
    (tmp_path / "train.txt").write_text("".join(f"{name} {i % 2}\n" for i, name in enumerate(kinds)) + "rgb.png 1\n")
    (tmp_path / "test.txt").write_text("rgb.png 0\nrgb.png 1\n")
    data = lt_data.load_image_list(str(tmp_path / "train.txt"), str(tmp_path / "test.txt"), str(tmp_path))
    with pytest.raises(lt_data.DataError, match=r"1 image file\(s\) cannot be used:\n.*truncated_small.jpg: cannot "
                                                "be decoded"):
        lt_data.check_image_files(data, "fail")
    checked = lt_data.check_image_files(data, "skip")
    assert checked.train.labels.tolist() == [0, 1, 1]  # rgb.png, palette.bmp and rgb.png again


def test_arrays_pass_and_have_a_fingerprint():
    from conftest import synthetic_data

    data = synthetic_data()
    assert lt_data.check_image_files(data) is not None
    assert lt_data.fingerprint(data.train) == lt_data.fingerprint(synthetic_data().train)
    assert lt_data.fingerprint(data.train) != lt_data.fingerprint(synthetic_data(seed=1).train)


def _mock_records_with_a_bad_one(self, split, decoders=None, read_config=None, **kwargs):
    """Three records: a good PNG, a truncated JPEG and a good JPEG (label = position)."""
    files = corpus()
    images = [files["rgb.png"][0], files["truncated_small.jpg"][0], files[GOOD][0]]

    def record(i):
        return {"image": tf.gather(tf.constant(images), i), "label": i}

    return tf.data.Dataset.range(3).map(record)


@pytest.mark.slow
def test_tfds_records_are_checked(tmp_path):
    stream = lt_data.TfdsStream("mnist", "train", None, "image", "label", 3)
    split = lt_data.Split(np.arange(3), np.array([0, 1, 2]), stream)
    data = lt_data.LabeledData("mock", split, split, ("0", "1", "2"), (8, 8, 3), (0.5,) * 3, (0.25,) * 3)
    with tfds.testing.mock_data(as_dataset_fn=_mock_records_with_a_bad_one, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(lt_data.DataError, match="mnist train record 1: cannot be decoded"):
            lt_data.check_image_files(data, "fail", str(tmp_path / "record"))
        with pytest.raises(lt_data.DataError, match="class '1' has no train images left"):
            lt_data.check_image_files(data, "skip", str(tmp_path / "record"))
        kept = lt_data.check_image_files(dataclasses_replace_train(data, [0, 2]), "skip", str(tmp_path / "record"))
        assert kept.train.images.tolist() == [0, 2]


def dataclasses_replace_train(data, positions):
    import dataclasses

    split = data.train.take(np.array(positions))
    return dataclasses.replace(data, train=split, test=split, class_names=("0", "1", "2"))
