"""Every Keras object the package registers survives get_config / from_config and a .keras
file: the same outputs (layers, models, losses, metrics), values (schedules, initializers)
or updates (the optimizer)."""

from pathlib import Path

import keras
import numpy as np
import pytest

from balpoe_tf import losses, metrics, models, task, training
from conftest import assert_float32_close

RNG = np.random.RandomState(0)


def _images(*shape):
    return RNG.uniform(-1, 1, shape).astype(np.float32)


# Registered layer -> (a small instance, an input).
LAYERS = {
    "FusedBatchNormalization": lambda: (models.FusedBatchNormalization(), _images(2, 4, 4, 3)),
    "CosineClassifier": lambda: (models.CosineClassifier(5, scale=16.0), _images(2, 6)),
    "PadShortcut": lambda: (models.PadShortcut(8, stride=2), _images(2, 4, 4, 4)),
    "BasicBlock": lambda: (models.BasicBlock(8, stride=2), _images(2, 8, 8, 4)),
    "ResNetStage": lambda: (models.ResNetStage(8, 2, stride=2), _images(2, 8, 8, 4)),
    "CifarResNetTrunk": lambda: (models.CifarResNetTrunk(depth=8, width=4), _images(2, 8, 8, 3)),
    "CifarResNetExpert": lambda: (models.CifarResNetExpert(5, depth=8, width=4), _images(2, 8, 8, 4)),
    "Bottleneck": lambda: (models.Bottleneck(4, stride=2, groups=2, base_width=32), _images(2, 8, 8, 16)),
    "BottleneckStage": lambda: (models.BottleneckStage(4, 2, stride=2), _images(2, 8, 8, 16)),
    "ImageNetResNetTrunk": lambda: (models.ImageNetResNetTrunk(), _images(1, 32, 32, 3)),
    "ImageNetResNetExpert": lambda: (models.ImageNetResNetExpert(5), _images(1, 4, 4, 512)),
}
OTHERS = ("BalPoENetwork", "BalPoEModel", "LogitAdjustedLoss", "SGDWithL2", "WarmupStepSchedule", "EpochCosineSchedule",
          "UnitColumnUniform", "GroupAccuracy", "CalibrationError")


def test_every_registered_object_is_covered():
    registered = {name.split(">")[1] for name in keras.saving.get_custom_objects() if name.startswith("balpoe_tf>")}
    assert registered == set(LAYERS) | set(OTHERS)


def _outputs(layer, x):
    out = layer(x, training=False)
    return [np.asarray(v) for v in (out.values() if isinstance(out, dict) else [out])]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_round_trips(name, tmp_path):
    layer, x = LAYERS[name]()
    inputs = keras.Input(x.shape[1:])
    model = keras.Model(inputs, layer(inputs))
    for w in model.weights:  # not the initial values: moving statistics and weights that matter
        w.assign(RNG.uniform(0.5, 1.5, w.shape).astype(np.float32) * np.sign(w.numpy() + 1e-3))
    expected = _outputs(layer, x)

    clone = layer.__class__.from_config(layer.get_config())
    clone(x)  # built on the same input
    clone.set_weights(layer.get_weights())
    for a, b in zip(expected, _outputs(clone, x)):
        np.testing.assert_array_equal(a, b)

    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), expected[0])


@pytest.mark.slow
def test_model_loss_and_optimizer_round_trip(tmp_path):
    model = task.BalPoEModel(5, num_experts=2, backbone="resnet8", input_shape=(8, 8, 3))
    loss = losses.LogitAdjustedLoss([40, 10, 5, 2, 1], [1.0, -1.0])
    model.compile(training.SGDWithL2(training.WarmupStepSchedule(0.1, 3, 1, [2]), l2=1e-3), loss, mixup_alpha=0.4)
    x, y = _images(6, 8, 8, 3), np.array([0, 1, 2, 3, 4, 0])
    model.fit(x, y, epochs=1, batch_size=3, verbose=0)  # optimizer state that must survive
    expected = model(x, training=False)

    clone = task.BalPoEModel.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone(x, training=False)["expert_logits"], expected["expert_logits"])

    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    got = loaded(x, training=False)
    for key in ("logits", "expert_logits"):
        np.testing.assert_array_equal(got[key], expected[key])
    assert loaded.balpoe_loss.get_config() == loss.get_config() and loaded.mixup_alpha == 0.4
    assert int(loaded.optimizer.iterations) == 2
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(loaded.balpoe_loss(y, expected["expert_logits"]),
                                  loss(y, expected["expert_logits"]))


def test_uncompiled_model_round_trips(tmp_path):
    model = task.BalPoEModel(5, num_experts=2, backbone="resnet8", input_shape=(8, 8, 3))
    x = _images(2, 8, 8, 3)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert not loaded.compiled
    np.testing.assert_array_equal(loaded(x, training=False)["logits"], model(x, training=False)["logits"])


def test_a_network_alone_round_trips(tmp_path):
    network = models.BalPoENetwork(5, num_experts=2, backbone="resnet8", input_shape=(8, 8, 3))
    images = _images(2, 8, 8, 3)
    network.save(tmp_path / "network.keras")
    loaded = keras.saving.load_model(tmp_path / "network.keras")
    assert type(loaded) is models.BalPoENetwork
    assert_float32_close(loaded(images)["logits"], network(images)["logits"])
    # The task is the network with training: its forward pass is the network's.
    model = task.BalPoEModel.from_config(network.get_config())
    model.set_weights(network.get_weights())
    assert_float32_close(model(images)["expert_logits"], network(images)["expert_logits"])


def test_a_checkpoint_written_before_the_task_split_loads():
    """tests/fixtures/balpoe_model_before_task_split.keras was written by the code of commit b36a3cd,
    when one class held the network and its training: 2 experts, trained 2 steps, saved compiled."""
    from balpoe_tf import run_folder

    fixtures = Path(__file__).parent / "fixtures"
    expected = np.load(fixtures / "balpoe_model_before_task_split.npz")
    model = run_folder.load_model_file(str(fixtures / "balpoe_model_before_task_split.keras"))
    assert type(model) is task.BalPoEModel and model.num_experts == 2
    out = model(expected["images"], training=False)
    # Written on another machine: equal up to float32 rounding, not to the bit.
    assert_float32_close(out["logits"], expected["logits"])
    assert_float32_close(out["expert_logits"], expected["expert_logits"])
    assert int(model.optimizer.iterations) == int(expected["iterations"]) == 2  # the optimizer state too
    assert model.balpoe_loss.lambdas == [1.0, -1.0] and model.mixup_alpha == 0.4


def test_loss_round_trips():
    loss = losses.LogitAdjustedLoss([40, 10, 1], [1.0, 0.0, -1.0], target_mean_lambda=0.0)
    clone = losses.LogitAdjustedLoss.from_config(loss.get_config())
    logits = _images(4, 3, 3)
    y = np.array([0, 1, 2, 1])
    np.testing.assert_array_equal(loss(y, logits), clone(y, logits))


def test_optimizer_round_trips():
    optimizer = training.SGDWithL2(training.EpochCosineSchedule(0.2, 5, 4, 1), momentum=0.8, nesterov=False, l2=1e-3)
    clone = training.SGDWithL2.from_config(optimizer.get_config())
    assert clone.get_config() == optimizer.get_config()
    start = _images(3)
    gradient = keras.ops.convert_to_tensor(start * 0.5)
    results = []
    for opt in (optimizer, clone):
        var = keras.Variable(start)
        for _ in range(3):
            opt.apply_gradients([(gradient, var)])
        results.append(var.numpy())
    np.testing.assert_array_equal(*results)


@pytest.mark.parametrize("schedule", [training.WarmupStepSchedule(0.1, 4, 2, [3, 5], 0.2),
                                      training.EpochCosineSchedule(0.1, 4, 6, 1)], ids=lambda s: type(s).__name__)
def test_schedules_round_trip(schedule):
    clone = type(schedule).from_config(schedule.get_config())
    steps = np.arange(30)
    np.testing.assert_array_equal([float(schedule(s)) for s in steps], [float(clone(s)) for s in steps])


def test_initializer_round_trips():
    initializer = models.UnitColumnUniform(seed=3)
    clone = models.UnitColumnUniform.from_config(initializer.get_config())
    np.testing.assert_array_equal(initializer((6, 4)), clone((6, 4)))


@pytest.mark.parametrize("metric", [metrics.GroupAccuracy(3, train_counts=[200, 50, 5]),
                                    metrics.CalibrationError(num_bins=10)], ids=lambda m: type(m).__name__)
def test_metrics_round_trip(metric):
    clone = type(metric).from_config(metric.get_config())
    y, logits = np.array([0, 1, 2, 2, 1]), _images(5, 3) * 5
    results = []
    for m in (metric, clone):
        m.update_state(y, logits)
        results.append(m.result())
    first, second = results
    if isinstance(first, dict):
        assert first.keys() == second.keys()
        for key in first:
            np.testing.assert_array_equal(first[key], second[key])
    else:
        np.testing.assert_array_equal(first, second)
