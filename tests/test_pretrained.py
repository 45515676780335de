"""balpoe_tf.pretrained (--init_from): what is copied from which source, what is left and why,
and what is refused."""

import json
import re

import numpy as np
import pytest

from balpoe_tf import experiment, models, pretrained, run_data, task
from balpoe_tf.config import RunError
from balpoe_tf.run_config import RunConfig
from balpoe_tf.run_folder import checkpoints, load_model_file, load_run
from conftest import parse_config


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
