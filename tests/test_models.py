import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from balpoe_tf import data as lt_data
from balpoe_tf import losses, models, precision, task, training
from balpoe_tf.config import RunError
from conftest import skip_without_kernels, synthetic_data


def test_pad_shortcut_subsamples_and_pads_channels():
    x = np.arange(32, dtype=np.float32).reshape(1, 4, 4, 2)
    y = models.PadShortcut(4, stride=2)(x).numpy()
    assert y.shape == (1, 2, 2, 4)
    np.testing.assert_array_equal(y[..., 1:3], x[:, ::2, ::2, :])
    np.testing.assert_array_equal(y[..., [0, 3]], 0)


@pytest.mark.parametrize("shape,stride", [((2, 8, 6, 3), 2), ((1, 9, 9, 2), 2), ((2, 6, 6, 4), 3)])
def test_subsample_is_the_strided_slice_with_its_gradient(shape, stride):
    x = tf.constant(np.random.RandomState(0).randn(*shape).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours, expected = models.subsample(x, stride), x[:, ::stride, ::stride, :]
        weights = tf.random.stateless_normal(expected.shape, (1, 2))
        losses_ = [tf.reduce_sum(y * weights) for y in (ours, expected)]
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(tape.gradient(losses_[0], x), tape.gradient(losses_[1], x))


def _convolution_and_batch_norm(stride, groups):
    rng = np.random.RandomState(1)
    convolution = models.conv_layers(4, 3, stride, groups)
    bn = models.batch_norm()
    shape = (2, 6, 6, 4)
    for layer in convolution:
        layer.build(shape)
        shape = layer.compute_output_shape(shape)
    bn.build(shape)
    bn.gamma.assign(rng.uniform(0.5, 2.0, 4))
    bn.beta.assign(rng.randn(4))
    bn.moving_mean.assign(rng.randn(4))
    bn.moving_variance.assign(rng.uniform(0.2, 3.0, 4))
    return convolution, bn, rng.randn(2, 6, 6, 4).astype(np.float32)


def _unfolded(convolution, bn, x, training):
    for layer in convolution:
        x = layer(x)
    return bn(x, training=training)


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (2, 2)])
def test_conv_batch_norm_is_folded_at_inference_only(stride, groups):
    convolution, bn, x = _convolution_and_batch_norm(stride, groups)
    # Inference: the folded convolution (kernel * s, bias beta - mean * s) gives bn(conv(x)).
    np.testing.assert_allclose(models.conv_batch_norm(convolution, bn, x, training=False),
                               _unfolded(convolution, bn, x, False), rtol=1e-5, atol=1e-5)
    # Training: unchanged, batch statistics and the moving-statistics update included.
    expected = _unfolded(convolution, bn, x, True)
    moved = bn.moving_mean.numpy()
    np.testing.assert_array_equal(models.conv_batch_norm(convolution, bn, x, training=True), expected)
    assert not np.allclose(bn.moving_mean.numpy(), moved)


def test_synchronised_batch_norm_is_not_folded():
    convolution, bn, x = _convolution_and_batch_norm(1, 1)
    bn.synchronized = True  # takes Keras's own path; folding would bypass the synchronisation
    np.testing.assert_array_equal(models.conv_batch_norm(convolution, bn, x, training=False),
                                  _unfolded(convolution, bn, x, False))


@pytest.mark.parametrize("backbone,size", [("resnet8", 16), ("resnext50", 32)])
def test_model_inference_equals_the_unfolded_network(backbone, size, monkeypatch):
    model = task.BalPoEModel(5, 2, backbone, input_shape=(size, size, 3))
    rng = np.random.RandomState(2)
    for v in model.non_trainable_variables:
        v.assign(rng.uniform(0.5, 1.5, v.shape) if "variance" in v.path else rng.uniform(-0.2, 0.2, v.shape))
    x = rng.rand(3, size, size, 3).astype(np.float32)
    folded = model(x, training=False)["expert_logits"]
    for module in ("cifar_resnet", "imagenet_resnet"):
        monkeypatch.setattr(sys.modules[f"balpoe_tf.models.{module}"], "conv_batch_norm", _unfolded)
    np.testing.assert_allclose(folded, model(x, training=False)["expert_logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride,filters,out", [(1, 8, (2, 8, 8, 8)), (2, 16, (2, 4, 4, 16))])
def test_basic_block_shapes(stride, filters, out):
    block = models.BasicBlock(filters, stride)
    y = block(np.random.rand(2, 8, 8, 8).astype(np.float32))
    assert y.shape == out
    assert (block.shortcut is None) == (stride == 1 and filters == 8)
    assert block.compute_output_shape((2, 8, 8, 8)) == out


def test_fused_batch_norm_matches_keras_and_updates_like_pytorch():
    x = np.random.RandomState(0).randn(4, 3, 2, 2).astype(np.float32) * 2.0 + 1.0
    fused = models.FusedBatchNormalization(momentum=0.9, epsilon=1e-5)
    plain = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    for layer in (fused, plain):
        layer.build(x.shape)
        layer.gamma.assign([1.5, -0.5])
        layer.beta.assign([0.1, 0.2])
    inputs = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(inputs)
        sums = [tf.reduce_sum(layer(inputs, training=True) ** 3) for layer in (fused, plain)]
    np.testing.assert_allclose(sums[0], sums[1], rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(sums[0], inputs), tape.gradient(sums[1], inputs),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tape.gradient(sums[0], fused.gamma), tape.gradient(sums[1], plain.gamma),
                               rtol=1e-4)
    # Moving statistics: 0.9 * init + 0.1 * batch statistic, the variance unbiased (n = 24 - 1).
    flat = x.reshape(-1, 2)
    np.testing.assert_allclose(fused.moving_mean, 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(fused.moving_variance, 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
    # Inference normalises with the moving statistics.
    expected = (x - fused.moving_mean.numpy()) / np.sqrt(fused.moving_variance.numpy() + 1e-5) \
        * np.array([1.5, -0.5]) + np.array([0.1, 0.2])
    np.testing.assert_allclose(fused(x, training=False), expected, rtol=1e-5, atol=1e-5)


def test_strided_conv_uses_pytorch_grid():
    # With 1-pixel zero padding, output (0, 0) of a stride-2 3x3 conv is centred on input (0, 0).
    conv = models.conv3x3(1, 2)
    x = np.zeros((1, 6, 6, 1), np.float32)
    x[0, 0, 0] = 1.0
    y = x
    for layer in conv:
        y = layer(y)
    centre = conv[-1].kernel.numpy()[1, 1, 0, 0]
    assert y.shape == (1, 3, 3, 1) and float(y[0, 0, 0, 0]) == pytest.approx(centre)


def _trainable(layer):
    return sum(int(np.prod(w.shape)) for w in layer.trainable_weights)


@pytest.mark.slow
def test_resnet32_parameter_counts():
    model = task.BalPoEModel(100, 3, "resnet32")
    # Shared 23.8k, each expert 446k (stage 2 88.2k, stage 3 351.5k, classifier 6.4k).
    assert _trainable(model.trunk) == 23824
    assert _trainable(model.experts[0]) == 446080
    assert _trainable(model) == 23824 + 3 * 446080  # 1.36 M
    assert _trainable(task.BalPoEModel(100, 1, "resnet32")) == 469904  # 0.47 M


@pytest.mark.parametrize("num_experts", [1, 2, 5])
def test_outputs_are_mean_of_experts(num_experts):
    model = task.BalPoEModel(7, num_experts, "resnet8", input_shape=(8, 8, 3))
    out = model(np.random.rand(3, 8, 8, 3).astype(np.float32))
    assert out["expert_logits"].shape == (3, num_experts, 7)
    np.testing.assert_allclose(out["logits"], np.mean(out["expert_logits"], axis=1), rtol=1e-6)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="num_experts must be an integer >= 1"):
        task.BalPoEModel(10, 0, "resnet8")
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'"):
        task.BalPoEModel(10, 1, "resnet7")
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        models.CifarResNetTrunk(depth=30)


def test_cosine_classifier():
    layer = models.CosineClassifier(3, scale=30.0)
    features = np.random.RandomState(0).randn(4, 5).astype(np.float32)
    logits = layer(features).numpy()
    np.testing.assert_allclose(np.linalg.norm(layer.kernel.numpy(), axis=0), 1.0, rtol=1e-5)
    assert np.all(np.abs(logits) <= 30.0 + 1e-4)
    aligned = layer(layer.kernel.numpy()[:, :1].T * 7.0).numpy()
    assert aligned[0, 0] == pytest.approx(30.0, rel=1e-5)
    assert models.CosineClassifier.from_config(layer.get_config()).scale == 30.0


@pytest.mark.slow
def test_keras_file_round_trip(tmp_path):
    model = task.BalPoEModel(5, 2, "resnet8", scale=16.0, input_shape=(8, 8, 3))
    model.compile(training.SGDWithL2(0.05), losses.LogitAdjustedLoss([9, 5, 3, 2, 1], [1, -1]), 0.4)
    x = np.random.RandomState(1).rand(4, 8, 8, 3).astype(np.float32)
    model.fit(x, np.array([0, 1, 2, 3]), epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    for key in ("logits", "expert_logits"):
        np.testing.assert_array_equal(loaded(x)[key], model(x)[key])
    assert loaded.mixup_alpha == 0.4 and loaded.balpoe_loss.lambdas == [1.0, -1.0]
    assert loaded.get_config() == model.get_config()


def _compiled(num_experts=2, lr=0.1, alpha=0.0, data=None, seed=0):
    data = data or synthetic_data()
    keras.utils.set_random_seed(seed)
    model = task.BalPoEModel(data.num_classes, num_experts, "resnet8", input_shape=data.image_shape)
    lambdas = [1.0, -1.0][:num_experts] if num_experts == 2 else [0.0] * num_experts
    model.compile(training.SGDWithL2(lr, l2=5e-4),
                  losses.LogitAdjustedLoss(data.train_counts(), lambdas), mixup_alpha=alpha, seed=seed)
    return model, data


def test_lambda_list_must_match_experts():
    model = task.BalPoEModel(4, 3, "resnet8", input_shape=(8, 8, 3))
    with pytest.raises(ValueError, match="2 lambda value\\(s\\) \\[1.0, -1.0\\] for 3 experts"):
        model.compile(training.SGDWithL2(0.1), losses.LogitAdjustedLoss([1, 1, 1, 1], [1, -1]))


@pytest.mark.slow
def test_train_step_without_mixup_is_the_plain_loss():
    model, data = _compiled(lr=0.0, alpha=0.0)
    x = (data.train.images[:8].astype(np.float32) - 128) / 64
    y = data.train.labels[:8]
    expected = float(np.mean(model.balpoe_loss.call(y, model(x, training=True)["expert_logits"])))
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_training_decreases_the_loss_and_evaluates():
    model, data = _compiled(alpha=0.4)
    ds = lt_data.train_pipeline(data, 16, epochs=12, seed=0, augment="none")
    steps = lt_data.steps_per_epoch(len(data.train), 16)
    history = model.fit(ds, epochs=12, steps_per_epoch=steps, shuffle=False, verbose=0).history["loss"]
    assert history[-1] < 0.7 * history[0]
    logs = model.evaluate(lt_data.test_pipeline(data, 8), return_dict=True, verbose=0)
    for key in ("accuracy", "many_accuracy", "ece", "mce", "nll", "expert0_accuracy", "expert1_accuracy"):
        assert key in logs
    assert logs["accuracy"] > 0.5  # four easy colour classes


DISTRIBUTED = textwrap.dedent("""
    import sys
    import numpy as np
    import balpoe_tf
    import keras, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from balpoe_tf import losses, models, task, training

    sync_bn = sys.argv[1] == "sync"
    counts, x = [4, 3, 2], np.random.RandomState(0).randn(8, 8, 8, 3).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2, 0, 0])
    def build():
        keras.utils.set_random_seed(1)
        model = task.BalPoEModel(3, 2, "resnet8", input_shape=(8, 8, 3), sync_bn=sync_bn)
        model.compile(training.SGDWithL2(1.0, momentum=0.0, l2=0.0),
                      losses.LogitAdjustedLoss(counts, [1, -1]), mixup_alpha=0.0)
        return model

    def grads_and_loss(model, part):
        with tf.GradientTape() as tape:
            out = model(x[part], training=True)
            loss = tf.reduce_mean(model.balpoe_loss.call(y[part], out["expert_logits"]))
        return tape.gradient(loss, model.trainable_weights), float(loss)

    reference = build()
    start = [w.numpy() for w in reference.trainable_weights]
    if sync_bn:
        # Synchronised BN: exactly one device on the global batch.
        grads, loss = grads_and_loss(reference, slice(0, 8))
        expected = [w - g.numpy() for w, g in zip(start, grads)]
    else:
        # Per-replica BN: the average of the two replicas' half-batch gradients.
        (ga, la), (gb, lb) = grads_and_loss(reference, slice(0, 4)), grads_and_loss(reference, slice(4, 8))
        expected = [w - (a + b).numpy() / 2 for w, a, b in zip(start, ga, gb)]
        loss = (la + lb) / 2

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = build()
    for w, s in zip(model.trainable_weights, start):
        w.assign(s)
    logs = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=1, verbose=0).history
    err = max(float(np.max(np.abs(w.numpy() - e))) for w, e in zip(model.trainable_weights, expected))
    print("replicas", strategy.num_replicas_in_sync, "max_error", err, "loss", logs["loss"][0], loss)
    assert strategy.num_replicas_in_sync == 2 and err < 1e-4, err
    assert abs(logs["loss"][0] - loss) < 1e-4, (logs["loss"][0], loss)
""")


@pytest.mark.slow
@pytest.mark.parametrize("bn", ["per_replica", "sync"])
def test_mirrored_strategy_matches_one_device(bn):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", DISTRIBUTED, bn], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "replicas 2" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("backbone,without_fc", [("resnet50", 23508032), ("resnext50", 22979904)])
def test_imagenet_backbone_parameter_counts(backbone, without_fc):
    # torchvision's resnet50 / resnext50_32x4d have these many parameters without the fc layer.
    model = task.BalPoEModel(1000, 3, backbone, input_shape=(224, 224, 3))
    trunk, expert = _trainable(model.trunk), _trainable(model.experts[0])
    assert trunk + expert - 2048 * 1000 == without_fc
    assert _trainable(model) == trunk + 3 * expert
    assert model.trunk.compute_output_shape((None, 224, 224, 3)) == (None, 28, 28, 512)


def test_bottleneck_projection_and_groups():
    block = models.Bottleneck(8, stride=2, groups=4, base_width=16)  # inner width int(8 * 16 / 64) * 4 = 8
    y = block(np.random.rand(2, 8, 8, 16).astype(np.float32))
    assert y.shape == (2, 4, 4, 32) and block.projection
    conv3x3 = [l for l in block.main if isinstance(l, keras.layers.Conv2D)][1]
    assert conv3x3.groups == 4 and conv3x3.kernel.shape == (3, 3, 2, 8)  # 2 input channels per group
    same = models.Bottleneck(8)
    same.build((None, 8, 8, 32))
    assert not same.projection  # identity shortcut when stride and width are unchanged


@pytest.mark.slow
def test_resnext_ensemble_runs_small_images():
    model = task.BalPoEModel(5, 2, "resnext50", input_shape=(64, 64, 3))
    out = model(np.random.rand(2, 64, 64, 3).astype(np.float32))
    assert out["expert_logits"].shape == (2, 2, 5)


def test_precision_policy_holds_inside_the_block_and_is_restored_after_an_error(monkeypatch):
    monkeypatch.setattr(precision, "kernel_problem", lambda name: "")  # the policy, whatever the kernels
    with pytest.raises(ValueError, match="inside"):
        with models.precision_policy("mixed_bfloat16"):
            assert keras.layers.Dense(2).compute_dtype == "bfloat16"
            raise ValueError("inside")
    assert keras.mixed_precision.global_policy().name == "float32"
    with models.precision_policy(""):  # keeps the current policy
        assert keras.layers.Dense(2).compute_dtype == "float32"


def test_a_precision_without_kernels_is_refused_with_the_cause_and_the_fix(monkeypatch):
    monkeypatch.setattr(precision, "kernel_problem", lambda name: "AbortedError: no primitive" * (name != "float32"))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    with pytest.raises(RunError, match=r"^precision mixed_bfloat16: TensorFlow has no convolution kernel for it in "
                                       r"this process \(AbortedError: no primitive\); ONEDNN_MAX_CPU_ISA=AVX2 caps "
                                       r"oneDNN .* unset it, or use --precision=float32$"):
        with models.precision_policy("mixed_bfloat16"):
            pass
    assert keras.mixed_precision.global_policy().name == "float32"
    with models.precision_policy("float32"):
        assert keras.layers.Dense(2).compute_dtype == "float32"


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_the_loss_in_float32(policy):
    skip_without_kernels(policy)
    with models.precision_policy(policy):
        data = synthetic_data()
        model = task.BalPoEModel(data.num_classes, 2, "resnet8", input_shape=data.image_shape)
        optimizer = training.SGDWithL2(0.05)
        if policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer, losses.LogitAdjustedLoss(data.train_counts(), [1, -1]), mixup_alpha=0.4)
        x = (data.train.images[:8].astype(np.float32) - 128) / 64
        out = model(x)
        assert out["logits"].dtype == "float32" and out["expert_logits"].dtype == "float32"
        assert model.trunk.stem.compute_dtype == policy.split("_")[1]
        logs = model.train_on_batch(x, data.train.labels[:8], return_dict=True)
        assert np.isfinite(logs["loss"])
    assert keras.mixed_precision.global_policy().name == "float32"
