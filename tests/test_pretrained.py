"""balpoe_tf.pretrained (--init_from): what is copied from which source, what is left and why,
and what is refused."""

import json
import re

import keras
import numpy as np
import pytest

from balpoe_tf import experiment, models, pretrained, run_data, task
from balpoe_tf.config import RunError
from balpoe_tf.run_config import RunConfig
from balpoe_tf.run_folder import checkpoints, load_model_file, load_run
from conftest import assert_float32_close, parse_config


def _network(experts, classes=4, channels=3, backbone="resnet8"):
    return models.BalPoENetwork(classes, experts, backbone, input_shape=(8, 8, channels))


def _body(part):
    return [w.numpy() for w in pretrained._body(part)]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_a_one_expert_network_seeds_the_trunk_and_every_expert_but_not_the_classifiers():
    source, target = _network(1, classes=5), _network(3)
    before = [w.numpy() for w in target.weights]
    report = pretrained.copy_weights(source, target, "source.keras")
    assert _same(_body(target.trunk), _body(source.trunk))
    for expert in target.experts:
        assert _same(_body(expert), _body(source.experts[0]))
        assert expert.classifier.kernel.shape == (64, 4)  # its own: 4 classes here, 5 in the source
    classifiers = {id(w) for e in target.experts for w in e.classifier.weights}
    unchanged = [np.array_equal(b, w.numpy()) for b, w in zip(before, target.weights) if id(w) in classifiers]
    assert unchanged and all(unchanged)
    body = [w for part in (target.trunk, *target.experts) for w in pretrained._body(part)]
    assert (report.loaded_tensors, report.total_tensors, report.left) == (len(body), len(body), [])
    assert report.loaded_params == report.total_params == sum(int(np.prod(w.shape)) for w in body)
    # The part fine-tuning acts on: the trainable tensors copied, by their index in the model.
    index = {id(v): i for i, v in enumerate(target.trainable_variables)}
    assert report.pretrained == sorted(index[id(w)] for w in body if w.trainable)
    # ResNet-8: a trunk of 15 tensors (stem and one block: 3 convolutions, 3 x 4 batch-norm tensors),
    # an expert of 20 (two blocks) besides its classifier's kernel.
    assert "init_from source.keras: loaded 75 of 75 tensors" in report.summary()


def test_experts_pair_by_index_and_a_mismatched_tensor_is_left_and_named():
    source, target = _network(2, channels=1), _network(3, channels=3)
    report = pretrained.copy_weights(source, target, "s")
    assert _same(_body(target.experts[1]), _body(source.experts[1]))
    assert _same(_body(target.experts[2]), _body(source.experts[0]))  # 2 mod 2
    (name, why), = report.left  # the stem: 1 image channel there, 3 here
    assert re.fullmatch(r"trunk/conv2d(_\d+)?/kernel", name), name
    assert why == "shape (3, 3, 1, 16) in the source, (3, 3, 3, 16) here"
    assert report.loaded_params == report.total_params - 3 * 3 * 3 * 16
    assert "1 left at their initial values: " in report.summary()
    assert report.to_dict()["left"] == [{"tensor": name, "why": why}]


def test_a_source_that_fills_too_little_is_refused_naming_the_mismatches(tmp_path, monkeypatch):
    _network(1, channels=1).save(tmp_path / "gray.keras")
    monkeypatch.setattr(pretrained, "MIN_LOADED_SHARE", 1.0)
    with pytest.raises(RunError, match=r"fills only .* parameters outside the classifiers; first mismatches: "
                                       r"trunk/conv2d(_\d+)?/kernel: shape \(3, 3, 1, 16\) in the source"):
        pretrained.initialise(_network(3), str(tmp_path / "gray.keras"))


def test_a_weights_file_is_read_with_its_experts_and_classes(tmp_path):
    source = _network(2, classes=7)
    source.save_weights(tmp_path / "net.weights.h5")
    target = _network(3)
    report = pretrained.initialise(target, str(tmp_path / "net.weights.h5"))
    assert report.source == str(tmp_path / "net.weights.h5") and not report.left
    assert _same(_body(target.trunk), _body(source.trunk))


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nothing_here", "does not exist: pass a run folder"),
    (lambda d: d, "is a folder without a run's config.json"),
    (lambda d: _network(1, backbone="resnet20").save(d / "r20.keras") or d / "r20.keras",
     "is a resnet20 network and this run's --backbone is resnet8: pass --backbone=resnet20"),
    (lambda d: (d / "junk.weights.h5").write_bytes(b"not hdf5") and d / "junk.weights.h5",
     "is not a readable weights file"),
])
def test_unusable_sources_are_refused_with_the_fix(tmp_path, make, message):
    with pytest.raises(RunError, match=message):
        pretrained.initialise(_network(3), str(make(tmp_path)))


def test_fine_tuning_flags_need_init_from_and_a_free_epoch():
    with pytest.raises(ValueError, match=r"2 settings must change:\n  --pretrained_lr_factor=0.1: must be 1.0 "
                                         r"without --init_from .*\n  --frozen_epochs=2: must be 0 without"):
        parse_config(RunConfig, "--pretrained_lr_factor=0.1", "--frozen_epochs=2")
    with pytest.raises(ValueError, match=r"--frozen_epochs=5: must be below --epochs=5"):
        parse_config(RunConfig, "--init_from=run", "--epochs=5", "--warmup_epochs=0", "--milestones=",
                     "--frozen_epochs=5")


@pytest.mark.slow
def test_init_from_a_run_folder_starts_from_its_trunk_and_keeps_it_while_frozen(tmp_path):
    base = ["--flagfile=configs/demo.flags", "--compare=", "--noexport", "--warmup_epochs=0", "--milestones=",
            "--eval_every=1", "--checkpoint_every=1"]
    source_dir, run_dir = tmp_path / "source", tmp_path / "run"
    source_config = parse_config(RunConfig, *base, "--flagfile=configs/base/ce.flags", "--epochs=1",
                                 f"--output_dir={source_dir}")
    experiment.train(source_config, log=lambda line: None)
    source, _ = load_run(str(source_dir))
    config = parse_config(RunConfig, *base, "--epochs=2", "--frozen_epochs=1", "--pretrained_lr_factor=0.5",
                          f"--init_from={source_dir}", f"--output_dir={run_dir}")
    # Before the first step: the trunk and every expert's stages are the source's.
    data = run_data.load_data(config)
    model = task.build_model(config, data, 8, experiment._initialise(config, lambda report: None))
    assert _same(_body(model.trunk), _body(source.trunk))
    assert all(_same(_body(e), _body(source.experts[0])) for e in model.experts)
    logs = []
    experiment.train(config, log=logs.append)
    assert any(line.startswith(f"init_from {source_dir}/model.keras: loaded ") for line in logs), logs
    record = json.loads((run_dir / "config.json").read_text())
    assert record["init_from"]["loaded_tensors"] == record["init_from"]["total_tensors"] > 0
    assert record["optimizer"]["config"]["frozen_steps"] == record["steps_per_epoch"]
    # After the frozen epoch the trainable trunk is still the source's; the classifiers trained.
    after_one = load_model_file(dict(checkpoints(str(run_dir)))[(1, 0)])
    trainable = [w.numpy() for w in after_one.trunk.trainable_weights]
    assert _same(trainable, [w.numpy() for w in source.trunk.trainable_weights])
    final, _ = load_run(str(run_dir))
    assert not _same([w.numpy() for w in final.trunk.trainable_weights], trainable)  # then it trains


def _keras_hub_resnet50(target):
    """keras-hub's ResNet-50 (random weights, random batch-norm statistics, no download)."""
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.ResNetBackbone(**target.trunk.keras_hub_config(), image_shape=(None, None, 3))
    rng = np.random.default_rng(0)
    for layer in backbone.layers:
        if layer.name.endswith("_bn"):  # gamma, beta, moving mean, moving variance: none at its default
            for w, low in zip(layer.weights, (0.5, -0.5, -0.5, 0.5)):
                w.assign(rng.uniform(low, low + 1.0, w.shape).astype("float32"))
    return backbone


@pytest.mark.slow
def test_a_keras_hub_resnet50_is_this_resnet50_layer_for_layer(tmp_path):
    target = models.BalPoENetwork(4, 2, "resnet50", input_shape=(32, 32, 3))
    source = _keras_hub_resnet50(target)
    report = pretrained.copy_named_weights(source, target, "hub")
    assert report.left == [] and report.loaded_tensors == report.total_tensors
    # The same function, not only the same tensors: the trunk ends where keras-hub's stack 1 does,
    # and each expert's stages compute its stacks 2 and 3.
    images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    cut = keras.Model(source.input, source.get_layer("stack1_block3_out").output)
    features = target.trunk(images, training=False)
    assert_float32_close(features, cut(images, training=False))
    for expert in target.experts:
        out = expert.layer4(expert.layer3(features, training=False), training=False)
        assert_float32_close(out, source(images, training=False))


@pytest.mark.slow
def test_a_keras_hub_preset_folder_keras_file_and_weights_file_initialise_resnet50(tmp_path):
    target = models.BalPoENetwork(4, 3, "resnet50", input_shape=(32, 32, 3))
    source = _keras_hub_resnet50(target)
    source.save_to_preset(str(tmp_path / "preset"))
    source.save(tmp_path / "plain.keras")
    source.save_weights(tmp_path / "plain.weights.h5")
    expected = [w.numpy() for w in source.weights]
    for path in (tmp_path / "preset", tmp_path / "plain.keras", tmp_path / "plain.weights.h5"):
        fresh = models.BalPoENetwork(4, 3, "resnet50", input_shape=(32, 32, 3))
        report = pretrained.initialise(fresh, str(path))
        assert (report.source, report.left) == (str(path), [])
        copied = {name: layer for name, layer in fresh.trunk.keras_hub_names() + fresh.experts[2].keras_hub_names()}
        for name, layer in copied.items():
            assert _same([w.numpy() for w in layer.weights], [w.numpy() for w in source.get_layer(name).weights])
    assert _same([w.numpy() for w in source.weights], expected)  # the source is read, not changed


@pytest.mark.slow
def test_plain_sources_that_do_not_fit_are_refused_with_the_fix(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    resnet50 = models.BalPoENetwork(4, 1, "resnet50", input_shape=(32, 32, 3))
    tiny = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="bottleneck_block", image_shape=(None, None, 3))
    tiny.save_to_preset(str(tmp_path / "tiny"))
    with pytest.raises(RunError, match=r"--init_from=.*tiny fills only .* first mismatches: trunk/.*: shape "
                                       r"\(3, 3, 3, 64\) in the source's conv1_conv, \(7, 7, 3, 64\) here.* Pass "
                                       r"keras-hub's bottleneck ResNet-50 \(e.g. the preset resnet_50_imagenet\)"):
        pretrained.initialise(resnet50, str(tmp_path / "tiny"))
    with pytest.raises(RunError, match=r"--init_from=no_such_preset \(no such file or folder: read as a preset\): "
                                       "keras-hub cannot load this preset"):
        pretrained.initialise(resnet50, "no_such_preset")
    dense = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    dense.save_weights(tmp_path / "dense.weights.h5")
    with pytest.raises(RunError, match="holds neither a BalPoE network's weights nor keras-hub's ResNet-50's"):
        pretrained.initialise(resnet50, str(tmp_path / "dense.weights.h5"))
    # A backbone without a keras-hub counterpart is refused before anything is read or downloaded.
    with pytest.raises(RunError, match="--init_from=resnet_50_imagenet names no file or folder here, so it is read "
                                       "as a keras-hub preset, and --backbone=resnet8 has no keras-hub counterpart"):
        pretrained.initialise(_network(3), "resnet_50_imagenet")
    with pytest.raises(RunError, match=r"is a plain backbone .* --backbone=resnet8 has no keras-hub counterpart"):
        pretrained.initialise(_network(3, backbone="resnet8"), str(tmp_path / "tiny"))
