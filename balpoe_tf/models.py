"""BalPoE networks: a shared trunk, M expert heads with cosine classifiers, and the
Keras model that trains them with mixup and logit-adjusted losses."""

import numpy as np

import keras
import tensorflow as tf
from keras import layers, ops

from balpoe_tf import metrics as lt_metrics
from balpoe_tf.training import mix, mixup_draw, mixup_loss

# PyTorch's kaiming_normal_ (fan_in, ReLU gain), which the reference CIFAR ResNet uses.
def _conv_init():
    return keras.initializers.VarianceScaling(2.0, "fan_in", "untruncated_normal")


@keras.saving.register_keras_serializable("balpoe_tf")
class FusedBatchNormalization(layers.BatchNormalization):
    """`BatchNormalization` on NHWC images computed by TensorFlow's fused kernel.

    Keras 3 normalises with separate moment, subtract, scale and shift ops; with the
    fused kernel (one op forward, one backward) the 3-expert ResNet-32 trains about 1.4x
    as fast on CPU (docs/results.md). Same weights, same outputs. The moving variance is
    updated with the unbiased batch variance, as PyTorch's BatchNorm2d does (Keras uses
    the biased one). Synchronised batch norm, masks and inputs that are not 4-D
    channels-last take the Keras path.
    """

    def call(self, inputs, training=None, mask=None):
        if (mask is not None or self.synchronized or self.renorm or len(inputs.shape) != 4
                or self.axis not in (-1, 3) or not (self.scale and self.center)):
            return super().call(inputs, training=training, mask=mask)
        train = bool(training) and self.trainable
        empty = tf.zeros([0], "float32")
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=ops.cast(self.gamma, "float32"), offset=ops.cast(self.beta, "float32"),
            mean=empty if train else ops.cast(self.moving_mean, "float32"),
            variance=empty if train else ops.cast(self.moving_variance, "float32"),
            epsilon=self.epsilon, data_format="NHWC", is_training=train)
        if train:
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum
                                        + variance * (1.0 - self.momentum))
        return ops.cast(outputs, self.compute_dtype)


def _batch_norm():
    # PyTorch BatchNorm2d defaults: momentum 0.1 (Keras 0.9), eps 1e-5.
    return FusedBatchNormalization(momentum=0.9, epsilon=1e-5)


@keras.saving.register_keras_serializable("balpoe_tf")
class UnitColumnUniform(keras.initializers.Initializer):
    """Uniform(-1, 1) columns rescaled to unit L2 norm (the reference cosine-classifier init)."""

    def __init__(self, seed=None):
        self.seed = seed

    def __call__(self, shape, dtype=None):
        w = keras.random.uniform(shape, -1.0, 1.0, dtype=dtype, seed=self.seed)
        return w / ops.sqrt(ops.sum(ops.square(w), axis=0, keepdims=True))

    def get_config(self):
        return {"seed": self.seed}


def _l2_normalize(x, axis):
    # torch.nn.functional.normalize: x / max(||x||, 1e-12).
    return x / ops.maximum(ops.sqrt(ops.sum(ops.square(x), axis=axis, keepdims=True)), 1e-12)


@keras.saving.register_keras_serializable("balpoe_tf")
class CosineClassifier(layers.Layer):
    """Logits `scale * cos(feature, class weight)`; no bias.

    Args:
        num_classes: number of classes C.
        scale: logit scale s (30 in the official code, 32 in the paper).
    """

    def __init__(self, num_classes, scale=30.0, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.scale = scale

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.num_classes),
                                      initializer=UnitColumnUniform(), name="kernel")

    def call(self, features):
        """Args: features `(B, D)`. Returns: float32 logits `(B, C)`."""
        # float32 even under mixed precision: a float16 sum of 2048 squares can overflow.
        features = ops.cast(features, "float32")
        w = _l2_normalize(ops.cast(self.kernel, "float32"), axis=0)
        return self.scale * ops.matmul(_l2_normalize(features, axis=-1), w)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "scale": self.scale}


def _strided_shape(input_shape, stride, filters):
    """NHWC shape after a stride-`stride` layer with `filters` output channels."""
    b, h, w, _ = input_shape
    size = lambda n: None if n is None else -(-n // stride)  # noqa: E731
    return (b, size(h), size(w), filters)


@keras.saving.register_keras_serializable("balpoe_tf")
class PadShortcut(layers.Layer):
    """Option-A (parameter-free) shortcut: take every `stride`-th pixel, then zero-pad
    the channels symmetrically up to `filters`."""

    def __init__(self, filters, stride=1, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.stride = stride

    def call(self, x):
        if self.stride > 1:
            x = x[:, ::self.stride, ::self.stride, :]
        extra = self.filters - x.shape[-1]
        return ops.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, self.stride, self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "stride": self.stride}


def _conv3x3(filters, stride):
    # Explicit 1-pixel padding keeps PyTorch's sampling grid for stride 2 (TF "same"
    # would shift it by one pixel), so the strided conv and the shortcut line up.
    if stride == 1:
        return [layers.Conv2D(filters, 3, padding="same", use_bias=False,
                              kernel_initializer=_conv_init())]
    return [layers.ZeroPadding2D(1),
            layers.Conv2D(filters, 3, strides=stride, padding="valid", use_bias=False,
                          kernel_initializer=_conv_init())]


@keras.saving.register_keras_serializable("balpoe_tf")
class BasicBlock(layers.Layer):
    """ResNet basic block: conv-BN-ReLU, conv-BN, + option-A shortcut, ReLU.

    Args:
        filters: output channels.
        stride: stride of the first conv (and of the shortcut).
    """

    def __init__(self, filters, stride=1, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.stride = stride
        self.conv1 = _conv3x3(filters, stride)
        self.bn1 = _batch_norm()
        self.conv2 = _conv3x3(filters, 1)
        self.bn2 = _batch_norm()
        self.shortcut = None

    def build(self, input_shape):
        if self.stride != 1 or input_shape[-1] != self.filters:
            self.shortcut = PadShortcut(self.filters, self.stride)
        shape = input_shape
        for layer in self.conv1:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.bn1.build(shape)
        for layer in self.conv2:
            layer.build(shape)
        self.bn2.build(shape)

    def call(self, x, training=None):
        y = x
        for layer in self.conv1:
            y = layer(y)
        y = ops.relu(self.bn1(y, training=training))
        for layer in self.conv2:
            y = layer(y)
        y = self.bn2(y, training=training)
        return ops.relu(y + (self.shortcut(x) if self.shortcut is not None else x))

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, self.stride, self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "stride": self.stride}


class _BlockStack(layers.Layer):
    """Residual blocks (`self.units`) applied in sequence."""

    def build(self, input_shape):
        for unit in self.units:
            unit.build(input_shape)
            input_shape = unit.compute_output_shape(input_shape)

    def call(self, x, training=None):
        for unit in self.units:
            x = unit(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        for unit in self.units:
            input_shape = unit.compute_output_shape(input_shape)
        return input_shape


@keras.saving.register_keras_serializable("balpoe_tf")
class ResNetStage(_BlockStack):
    """`blocks` basic blocks at `filters` channels; the first has the stride."""

    def __init__(self, filters, blocks, stride=1, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.blocks, self.stride = filters, blocks, stride
        self.units = [BasicBlock(filters, stride if i == 0 else 1, name=f"block{i}")
                      for i in range(blocks)]

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "blocks": self.blocks,
                "stride": self.stride}


def _blocks_per_stage(depth):
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110), got {depth}")
    return (depth - 2) // 6


@keras.saving.register_keras_serializable("balpoe_tf")
class CifarResNetTrunk(layers.Layer):
    """Shared part of a CIFAR ResNet: 3x3 stem conv, BN, ReLU and stage 1.

    Args:
        depth: 6n+2 (32 for ResNet-32).
        width: channels of stage 1 (16); later stages double it.
    """

    def __init__(self, depth=32, width=16, **kwargs):
        super().__init__(**kwargs)
        self.depth, self.width = depth, width
        self.stem = layers.Conv2D(width, 3, padding="same", use_bias=False,
                                  kernel_initializer=_conv_init())
        self.stem_bn = _batch_norm()
        self.stage1 = ResNetStage(width, _blocks_per_stage(depth), 1, name="stage1")

    def build(self, input_shape):
        self.stem.build(input_shape)
        shape = self.stem.compute_output_shape(input_shape)
        self.stem_bn.build(shape)
        self.stage1.build(shape)

    def call(self, x, training=None):
        x = ops.relu(self.stem_bn(self.stem(x), training=training))
        return self.stage1(x, training=training)

    def compute_output_shape(self, input_shape):
        return self.stage1.compute_output_shape(self.stem.compute_output_shape(input_shape))

    def get_config(self):
        return {**super().get_config(), "depth": self.depth, "width": self.width}


@keras.saving.register_keras_serializable("balpoe_tf")
class CifarResNetExpert(layers.Layer):
    """One expert of a CIFAR ResNet: stages 2 and 3 at full width, global average
    pooling and a cosine classifier.

    Args:
        num_classes: number of classes.
        depth: 6n+2.
        width: channels of stage 1 (stages 2, 3 have 2x and 4x).
        scale: cosine-classifier scale.
    """

    def __init__(self, num_classes, depth=32, width=16, scale=30.0, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.depth, self.width, self.scale = num_classes, depth, width, scale
        n = _blocks_per_stage(depth)
        self.stage2 = ResNetStage(2 * width, n, 2, name="stage2")
        self.stage3 = ResNetStage(4 * width, n, 2, name="stage3")
        self.classifier = CosineClassifier(num_classes, scale, name="classifier")

    def build(self, input_shape):
        self.stage2.build(input_shape)
        shape = self.stage2.compute_output_shape(input_shape)
        self.stage3.build(shape)
        self.classifier.build((None, 4 * self.width))

    def call(self, x, training=None):
        x = self.stage3(self.stage2(x, training=training), training=training)
        return self.classifier(ops.mean(x, axis=(1, 2)))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "depth": self.depth,
                "width": self.width, "scale": self.scale}


def _cifar_resnet(depth, width=16):
    def build(num_classes, num_experts, scale):
        trunk = CifarResNetTrunk(depth, width, name="trunk")
        experts = [CifarResNetExpert(num_classes, depth, width, scale, name=f"expert{m}")
                   for m in range(num_experts)]
        return trunk, experts
    return build


def _he_fan_out():
    # The reference ImageNet ResNets draw conv weights from N(0, 2 / (k * k * out_channels)).
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def _conv(filters, kernel, stride=1, groups=1):
    """Conv layers with PyTorch's padding (kernel // 2 on each side, then 'valid')."""
    pad = kernel // 2
    conv = layers.Conv2D(filters, kernel, strides=stride, padding="valid", groups=groups,
                         use_bias=False, kernel_initializer=_he_fan_out())
    return [layers.ZeroPadding2D(pad), conv] if pad else [conv]


def _build_chain(chain, input_shape):
    for layer in chain:
        layer.build(input_shape)
        input_shape = layer.compute_output_shape(input_shape)
    return input_shape


def _run_chain(chain, x, training):
    for layer in chain:
        x = layer(x, training=training) if isinstance(layer, layers.BatchNormalization) else layer(x)
    return x


@keras.saving.register_keras_serializable("balpoe_tf")
class Bottleneck(layers.Layer):
    """ResNet / ResNeXt bottleneck: 1x1, 3x3 (stride, groups), 1x1 (x4), each with BN,
    ReLU after the first two and after the sum with the shortcut (a 1x1 conv + BN
    projection when the stride or width changes).

    Args:
        planes: inner planes; the output has 4 * planes channels.
        stride: stride of the 3x3 conv.
        groups: groups of the 3x3 conv (32 for ResNeXt-50 32x4d).
        base_width: width per group (64 for ResNet, 4 for ResNeXt 32x4d).
    """

    def __init__(self, planes, stride=1, groups=1, base_width=64, **kwargs):
        super().__init__(**kwargs)
        self.planes, self.stride, self.groups, self.base_width = planes, stride, groups, base_width
        width = int(planes * base_width / 64) * groups
        self.main = [*_conv(width, 1), _batch_norm(), layers.ReLU(),
                     *_conv(width, 3, stride, groups), _batch_norm(), layers.ReLU(),
                     *_conv(4 * planes, 1), _batch_norm()]
        self.projection = []

    def build(self, input_shape):
        if self.stride != 1 or input_shape[-1] != 4 * self.planes:
            self.projection = [*_conv(4 * self.planes, 1, self.stride), _batch_norm()]
        _build_chain(self.main, input_shape)
        _build_chain(self.projection, input_shape)

    def call(self, x, training=None):
        shortcut = _run_chain(self.projection, x, training) if self.projection else x
        return ops.relu(_run_chain(self.main, x, training) + shortcut)

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, self.stride, 4 * self.planes)

    def get_config(self):
        return {**super().get_config(), "planes": self.planes, "stride": self.stride,
                "groups": self.groups, "base_width": self.base_width}


@keras.saving.register_keras_serializable("balpoe_tf")
class BottleneckStage(_BlockStack):
    """`blocks` bottlenecks at `planes`; the first has the stride."""

    def __init__(self, planes, blocks, stride=1, groups=1, base_width=64, **kwargs):
        super().__init__(**kwargs)
        self.planes, self.blocks, self.stride = planes, blocks, stride
        self.groups, self.base_width = groups, base_width
        self.units = [Bottleneck(planes, stride if i == 0 else 1, groups, base_width, name=f"block{i}")
                      for i in range(blocks)]

    def get_config(self):
        return {**super().get_config(), "planes": self.planes, "blocks": self.blocks, "stride": self.stride,
                "groups": self.groups, "base_width": self.base_width}


@keras.saving.register_keras_serializable("balpoe_tf")
class ImageNetResNetTrunk(layers.Layer):
    """Shared part of ResNet-50 / ResNeXt-50: 7x7 stride-2 stem, BN, ReLU, 3x3 stride-2
    max-pool, layer1 (3 bottlenecks, 256 out) and layer2 (4, 512 out, stride 2)."""

    def __init__(self, groups=1, base_width=64, **kwargs):
        super().__init__(**kwargs)
        self.groups, self.base_width = groups, base_width
        # Zero padding before the max-pool equals PyTorch's -inf padding: inputs are >= 0 after ReLU.
        self.stem = [*_conv(64, 7, 2), _batch_norm(), layers.ReLU(), layers.ZeroPadding2D(1),
                     layers.MaxPooling2D(3, 2)]
        self.layer1 = BottleneckStage(64, 3, 1, groups, base_width, name="layer1")
        self.layer2 = BottleneckStage(128, 4, 2, groups, base_width, name="layer2")

    def build(self, input_shape):
        _build_chain(self.stem + [self.layer1, self.layer2], input_shape)

    def call(self, x, training=None):
        x = _run_chain(self.stem, x, training)
        return self.layer2(self.layer1(x, training=training), training=training)

    def compute_output_shape(self, input_shape):
        for layer in self.stem + [self.layer1, self.layer2]:
            input_shape = layer.compute_output_shape(input_shape)
        return input_shape

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "base_width": self.base_width}


@keras.saving.register_keras_serializable("balpoe_tf")
class ImageNetResNetExpert(layers.Layer):
    """One expert of ResNet-50 / ResNeXt-50: layer3 (6 bottlenecks, 1024 out), layer4
    (3, 2048 out), global average pooling (the reference ResNeXt's fixed 7x7 pool at
    224 px) and a cosine classifier."""

    def __init__(self, num_classes, groups=1, base_width=64, scale=30.0, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.groups, self.base_width, self.scale = num_classes, groups, base_width, scale
        self.layer3 = BottleneckStage(256, 6, 2, groups, base_width, name="layer3")
        self.layer4 = BottleneckStage(512, 3, 2, groups, base_width, name="layer4")
        self.classifier = CosineClassifier(num_classes, scale, name="classifier")

    def build(self, input_shape):
        _build_chain([self.layer3, self.layer4], input_shape)
        self.classifier.build((None, 2048))

    def call(self, x, training=None):
        x = self.layer4(self.layer3(x, training=training), training=training)
        return self.classifier(ops.mean(x, axis=(1, 2)))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "groups": self.groups,
                "base_width": self.base_width, "scale": self.scale}


def _imagenet_resnet(groups, base_width):
    def build(num_classes, num_experts, scale):
        trunk = ImageNetResNetTrunk(groups, base_width, name="trunk")
        experts = [ImageNetResNetExpert(num_classes, groups, base_width, scale, name=f"expert{m}")
                   for m in range(num_experts)]
        return trunk, experts
    return build


# One registry of backbones: name -> builder(num_classes, num_experts, scale).
BACKBONES = {
    "resnet32": _cifar_resnet(32),
    "resnet20": _cifar_resnet(20),
    "resnet8": _cifar_resnet(8),
    "resnet50": _imagenet_resnet(1, 64),
    "resnext50": _imagenet_resnet(32, 4),
}


@keras.saving.register_keras_serializable("balpoe_tf")
class BalPoEModel(keras.Model):
    """A Balanced Product of Experts: shared trunk, M experts, logits averaged.

    `call` returns a dict with `logits` (B, C), the mean of the expert logits, and
    `expert_logits` (B, M, C). `compile` takes the `LogitAdjustedLoss` and the mixup
    alpha; `train_step` mixes each batch and minimises
    `xi * L(y) + (1 - xi) * L(y[perm])`, with the loss summed over the replica's
    examples and divided by the global batch, so gradients summed across replicas
    are those of the global mean.

    Args:
        num_classes: number of classes C.
        num_experts: M >= 1.
        backbone: a key of `BACKBONES`.
        scale: cosine-classifier scale.
        input_shape: `(H, W, C)` of the images; the model is built for it.
        sync_bn: under tf.distribute, compute batch-norm statistics over the global
            batch (synchronised) instead of each replica's share.
    """

    def __init__(self, num_classes, num_experts=3, backbone="resnet32", scale=30.0,
                 input_shape=(32, 32, 3), sync_bn=False, **kwargs):
        super().__init__(**kwargs)
        if int(num_experts) < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts}")
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
        self.num_classes, self.num_experts = int(num_classes), int(num_experts)
        self.backbone, self.scale = backbone, float(scale)
        self.image_shape, self.sync_bn = tuple(input_shape), bool(sync_bn)
        self.trunk, self.experts = BACKBONES[backbone](self.num_classes, self.num_experts, self.scale)
        # Metrics are state, which Keras wants created before the model is built;
        # `compile` gives the group metric its training counts.
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.expert_accuracy = lt_metrics.expert_accuracies(self.num_experts)
        self.nll = keras.metrics.Mean(name="nll")
        self.groups = lt_metrics.GroupAccuracy(self.num_classes)
        self.calibration = lt_metrics.CalibrationError()
        self.balpoe_loss = None
        self.build((None,) + self.image_shape)

    def build(self, input_shape):
        self.trunk.build(input_shape)
        shape = self.trunk.compute_output_shape(input_shape)
        for expert in self.experts:
            expert.build(shape)
        # Keras reads `synchronized` at call time; set here, after the layers that create
        # batch norms in build() (the bottleneck projections) have done so.
        for layer in self._flatten_layers():
            if isinstance(layer, layers.BatchNormalization):
                layer.synchronized = self.sync_bn
        self.built = True

    def call(self, images, training=None):
        features = self.trunk(images, training=training)
        expert_logits = ops.stack([e(features, training=training) for e in self.experts], axis=1)
        expert_logits = ops.cast(expert_logits, "float32")
        return {"logits": ops.mean(expert_logits, axis=1), "expert_logits": expert_logits}

    def compile(self, optimizer, loss, mixup_alpha=0.0, seed=0, **kwargs):
        """Configure training.

        Args:
            optimizer: a Keras optimizer (e.g. `training.SGDWithL2`).
            loss: a `losses.LogitAdjustedLoss` with one lambda per expert.
            mixup_alpha: Beta(alpha, alpha) of mixup; 0 trains without mixup.
            seed: seed of the mixup draws (combined with the optimizer step, so a
                resumed run draws what an uninterrupted one would).
            **kwargs: passed to `keras.Model.compile` (e.g. `jit_compile`).
        """
        if loss.num_experts != self.num_experts:
            raise ValueError(f"{loss.num_experts} lambda value(s) {loss.lambdas} for "
                             f"{self.num_experts} experts: give exactly one lambda per expert "
                             "(or change --num_experts)")
        if len(loss.class_counts) != self.num_classes:
            raise ValueError(f"loss has {len(loss.class_counts)} class counts for a "
                             f"{self.num_classes}-class model")
        super().compile(optimizer=optimizer, **kwargs)
        self.balpoe_loss = loss
        self.mixup_alpha, self.mixup_seed = float(mixup_alpha), int(seed)
        self.groups.train_counts = loss.class_counts

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras builds a model's state by averaging a sample batch across replicas, an
        # eager collective that fails under MultiWorkerMirroredStrategy. This model is
        # built in __init__ and compile() makes the metrics, so only the optimizer is left.
        if self.optimizer is not None:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    def get_compile_config(self):
        return {"optimizer": keras.saving.serialize_keras_object(self.optimizer),
                "loss": keras.saving.serialize_keras_object(self.balpoe_loss),
                "mixup_alpha": self.mixup_alpha, "seed": self.mixup_seed}

    def compile_from_config(self, config):
        self.compile(keras.saving.deserialize_keras_object(config["optimizer"]),
                     keras.saving.deserialize_keras_object(config["loss"]),
                     config["mixup_alpha"], config["seed"])
        # Built now so that loading restores the saved optimizer state into it.
        self.optimizer.build(self.trainable_variables)

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy, *self.expert_accuracy, self.nll,
                self.groups, self.calibration]

    def _step_results(self, metrics):
        out = {}
        for metric in metrics:
            result = metric.result()
            out.update(result if isinstance(result, dict) else {metric.name: result})
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Keras averages step outputs across workers along axis 0, which a scalar lacks.
            out = {k: tf.reshape(v, [1]) for k, v in out.items()}
        return out

    def train_step(self, data):
        images, labels = data[0], tf.cast(data[1], tf.int32)
        local_n = tf.cast(tf.shape(labels)[0], tf.float32)
        replica = tf.distribute.get_replica_context()
        global_n = (replica.all_reduce(tf.distribute.ReduceOp.SUM, local_n)
                    if replica is not None and replica.num_replicas_in_sync > 1 else local_n)
        seed = tf.stack([tf.constant(self.mixup_seed, tf.int64),
                         tf.cast(self.optimizer.iterations, tf.int64)])
        xi, perm = mixup_draw(self.mixup_alpha, tf.shape(labels)[0], seed)
        mixed = mix(images, xi, perm)
        labels_b = tf.gather(labels, perm)
        with tf.GradientTape() as tape:
            out = self(mixed, training=True)
            per_example = mixup_loss(self.balpoe_loss, labels, out["expert_logits"], xi, perm)
            loss = tf.reduce_sum(per_example) / global_n
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))

        self.loss_tracker.update_state(tf.reduce_mean(per_example), sample_weight=local_n)
        # Accuracy on a mixed batch is the xi-weighted mix of both label sets, as the reference logs it.
        weights = tf.ones_like(per_example)
        for y, w in ((labels, xi * weights), (labels_b, (1.0 - xi) * weights)):
            self.accuracy.update_state(y, out["logits"], sample_weight=w)
            for m, metric in enumerate(self.expert_accuracy):
                metric.update_state(y, out["expert_logits"][:, m], sample_weight=w)
        return self._step_results([self.loss_tracker, self.accuracy, *self.expert_accuracy])

    def test_step(self, data):
        images, labels = data[0], tf.cast(data[1], tf.int32)
        out = self(images, training=False)
        self.loss_tracker.update_state(self.balpoe_loss.call(labels, out["expert_logits"]))
        self.nll.update_state(keras.losses.sparse_categorical_crossentropy(
            labels, out["logits"], from_logits=True))
        for m, metric in enumerate(self.expert_accuracy):
            metric.update_state(labels, out["expert_logits"][:, m])
        self.groups.update_state(labels, out["logits"])
        self.calibration.update_state(labels, out["logits"])
        return self._step_results([self.loss_tracker, *self.expert_accuracy, self.nll,
                                   self.groups, self.calibration])

    def get_config(self):
        return {"name": self.name, "num_classes": self.num_classes, "num_experts": self.num_experts,
                "backbone": self.backbone, "scale": self.scale, "input_shape": self.image_shape,
                "sync_bn": self.sync_bn}


def count_params(layer) -> int:
    """Number of trainable + non-trainable scalars of a built layer or model."""
    return int(sum(np.prod(w.shape) for w in layer.weights))
