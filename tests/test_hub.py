"""models.hub (--backbone=hub:PRESET): a keras-hub preset made here (random weights, no download)
as the trunk and experts, trained, saved, exported, and served by TensorFlow alone."""

import json
import subprocess
import sys

import numpy as np
import pytest

from balpoe_tf import experiment, models, pretrained, run_folder, task
from balpoe_tf.config import RunError
from balpoe_tf.run_config import RunConfig
from conftest import assert_float32_close, parse_config

keras_hub = pytest.importorskip("keras_hub")


def _preset(folder, stacks=3):
    """A tiny ResNet preset (keras-hub asks 64 filters in the first stage)."""
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[16], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16, 32][:stacks],
        stackwise_num_blocks=[1] * stacks, stackwise_num_strides=[1, 2, 2][:stacks], block_type="basic_block_vd",
        image_shape=(None, None, 3))
    backbone.save_to_preset(str(folder))
    return backbone


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a, b))


def test_a_resnet_preset_is_split_where_the_paper_splits_resnets(tmp_path):
    backbone = _preset(tmp_path / "preset")
    network = models.BalPoENetwork(4, 3, f"hub:{tmp_path / 'preset'}", input_shape=(32, 32, 3))
    # The trunk ends after the first stage; each expert holds its own copy of the last two,
    # initialised from the preset, so that together they are the preset's weights.
    assert [w.path for w in network.trunk.weights][-1].startswith("stack0_block0")
    for expert in network.experts:
        assert _same(network.trunk.weights + expert.body.weights, backbone.weights)
    assert len({id(w) for e in network.experts for w in e.body.weights}) == 3 * len(network.experts[0].body.weights)
    images = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    features = network.experts[0].body(network.trunk(images))
    assert_float32_close(features, backbone(images))  # the preset's own forward pass
    report = pretrained.preset_report(network)
    assert report.loaded_tensors == report.total_tensors and not report.left  # only the classifiers are new
    assert network.get_config()["hub_config"]["class_name"] == "ResNetBackbone"


def test_another_family_is_the_trunk_whole_with_a_dense_head_per_expert(tmp_path):
    _preset(tmp_path / "preset", stacks=2)  # too few stages to give the experts two
    network = models.BalPoENetwork(4, 2, f"hub:{tmp_path / 'preset'}", input_shape=(32, 32, 3))
    assert all(e.body is None and e.head.units == 16 for e in network.experts)  # the features: 16 channels
    report = pretrained.preset_report(network)
    assert [why for _, why in report.left] == ["a new layer"] * 4  # each head's kernel and bias


def test_without_keras_hub_the_error_names_the_extra(monkeypatch, tmp_path):
    _preset(tmp_path / "preset").save(tmp_path / "hub.keras")
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # as if not installed
    with pytest.raises(RunError, match=r'^--backbone=hub:resnet_18_imagenet needs keras-hub, an optional extra: '
                                       r'pip install -e "\.\[hub\]"$'):
        models.BalPoENetwork(4, 2, "hub:resnet_18_imagenet", input_shape=(32, 32, 3))
    with pytest.raises(RunError, match=r'^--init_from=resnet_50_imagenet \(no such file or folder: read as a '
                                       r'preset\) needs keras-hub, an optional extra: pip install -e "\.\[hub\]"$'):
        pretrained.initialise(models.BalPoENetwork(4, 1, "resnet50", input_shape=(32, 32, 3)), "resnet_50_imagenet")
    with pytest.raises(RunError, match=r'^--init_from=.*hub.keras \(a keras-hub model\) needs keras-hub'):
        pretrained.initialise(models.BalPoENetwork(4, 1, "resnet8", input_shape=(8, 8, 3)), str(tmp_path / "hub.keras"))


def test_init_from_a_preset_on_a_hub_backbone_names_the_flag_that_takes_it(tmp_path):
    _preset(tmp_path / "preset")
    network = models.BalPoENetwork(4, 1, f"hub:{tmp_path / 'preset'}", input_shape=(32, 32, 3))
    with pytest.raises(RunError, match=f"takes its weights from its own preset: pass --backbone=hub:{tmp_path}/preset "
                                       "without --init_from"):
        pretrained.initialise(network, str(tmp_path / "preset"))


def test_a_preset_keras_hub_cannot_load_is_named(tmp_path):
    with pytest.raises(RunError, match=f"--backbone=hub:{tmp_path}: keras-hub cannot load this preset"):
        models.BalPoENetwork(4, 2, f"hub:{tmp_path}", input_shape=(32, 32, 3))


SERVE_WITHOUT_KERAS_HUB = """
import sys
sys.modules["keras_hub"] = None  # serving must not need it
import numpy as np, tensorflow as tf
served = tf.saved_model.load(sys.argv[1]).signatures["predict_tensor"]
images = np.load(sys.argv[2])
np.save(sys.argv[3], served(images=tf.constant(images))["logits"].numpy())
"""


@pytest.mark.slow
def test_a_run_on_a_preset_trains_resumes_exports_and_serves_without_keras_hub(tmp_path):
    _preset(tmp_path / "preset")
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(3), [12, 6, 3])
    np.savez(tmp_path / "data.npz", x_train=rng.randint(0, 256, (21, 32, 32, 3), np.uint8), y_train=labels,
             x_test=rng.randint(0, 256, (6, 32, 32, 3), np.uint8), y_test=np.repeat(np.arange(3), 2))
    config = parse_config(RunConfig, "--dataset=npz", f"--data_path={tmp_path / 'data.npz'}", "--imbalance_ratio=0",
                          "--augment=none", f"--backbone=hub:{tmp_path / 'preset'}", "--epochs=2", "--batch_size=16",
                          "--warmup_epochs=0", "--milestones=", "--precision=float32", "--frozen_epochs=1",
                          "--pretrained_lr_factor=0.1", "--checkpoint_every=1", f"--output_dir={tmp_path / 'run'}")
    logs = []
    experiment.train(config, log=logs.append)
    assert any(line.startswith(f"init_from hub:{tmp_path / 'preset'}: loaded ") for line in logs), logs
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["init_from"]["loaded_tensors"] == record["init_from"]["total_tensors"]
    # Frozen through epoch 1: the trunk is still the preset's.
    first = run_folder.load_model_file(dict(run_folder.checkpoints(str(tmp_path / "run")))[(1, 0)])
    preset = keras_hub.models.Backbone.from_preset(str(tmp_path / "preset"))
    assert _same(first.trunk.trainable_weights, preset.trainable_weights[:len(first.trunk.trainable_weights)])
    model, _ = run_folder.load_run(str(tmp_path / "run"))
    assert type(model) is task.BalPoEModel and model.backbone == config.backbone
    images = rng.uniform(-2, 2, (4, 32, 32, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    served = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_KERAS_HUB, str(tmp_path / "run" / "export" / "1"),
                             str(tmp_path / "images.npy"), str(tmp_path / "logits.npy")],
                            capture_output=True, text=True, timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    assert_float32_close(np.load(tmp_path / "logits.npy"), model(images, training=False)["logits"])
