"""ImageNet ResNet-50 / ResNeXt-50 (32x4d): bottleneck blocks, a shared trunk and
per-expert last stages (parameter counts equal torchvision's)."""

import keras
from keras import layers, ops

from balpoe_tf.models.layers import (BlockStack, CosineClassifier, batch_norm, conv_batch_norm, conv_layers,
                                     strided_shape)


def _convs_and_norms(chain):
    return ([layer for layer in chain if isinstance(layer, layers.Conv2D)],
            [layer for layer in chain if isinstance(layer, layers.BatchNormalization)])


def _keras_hub_stage_names(stage, index):
    """(name, layer) of a stage's convolutions and batch norms, named as keras-hub's
    `ResNetBackbone` names the same layers of its stack `index` (`_0_` is the projection)."""
    named = []
    for b, block in enumerate(stage.units):
        convs, norms = _convs_and_norms(block.main)
        for k, (conv, norm) in enumerate(zip(convs, norms), 1):
            named += [(f"stack{index}_block{b}_{k}_conv", conv), (f"stack{index}_block{b}_{k}_bn", norm)]
        if block.projection:
            (conv,), (norm,) = _convs_and_norms(block.projection)
            named += [(f"stack{index}_block{b}_0_conv", conv), (f"stack{index}_block{b}_0_bn", norm)]
    return named


def _build_chain(chain, input_shape):
    for layer in chain:
        layer.build(input_shape)
        input_shape = layer.compute_output_shape(input_shape)
    return input_shape


def _run_chain(chain, x, training):
    pending = []  # padding and convolution layers, run together with the batch norm that follows them
    for layer in chain:
        if isinstance(layer, layers.BatchNormalization) and pending and isinstance(pending[-1], layers.Conv2D):
            x, pending = conv_batch_norm(pending, layer, x, training), []
        elif isinstance(layer, (layers.ZeroPadding2D, layers.Conv2D)):
            pending.append(layer)
        else:
            for p in pending:
                x = p(x)
            pending = []
            x = layer(x, training=training) if isinstance(layer, layers.BatchNormalization) else layer(x)
    for p in pending:
        x = p(x)
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
        self.main = [*conv_layers(width, 1), batch_norm(), layers.ReLU(),
                     *conv_layers(width, 3, stride, groups), batch_norm(), layers.ReLU(),
                     *conv_layers(4 * planes, 1), batch_norm()]
        self.projection = []

    def build(self, input_shape):
        if self.stride != 1 or input_shape[-1] != 4 * self.planes:
            self.projection = [*conv_layers(4 * self.planes, 1, self.stride), batch_norm()]
        _build_chain(self.main, input_shape)
        _build_chain(self.projection, input_shape)

    def call(self, x, training=None):
        shortcut = _run_chain(self.projection, x, training) if self.projection else x
        return ops.relu(_run_chain(self.main, x, training) + shortcut)

    def compute_output_shape(self, input_shape):
        return strided_shape(input_shape, self.stride, 4 * self.planes)

    def get_config(self):
        return {**super().get_config(), "planes": self.planes, "stride": self.stride,
                "groups": self.groups, "base_width": self.base_width}


@keras.saving.register_keras_serializable("balpoe_tf")
class BottleneckStage(BlockStack):
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
        self.stem = [*conv_layers(64, 7, 2), batch_norm(), layers.ReLU(), layers.ZeroPadding2D(1),
                     layers.MaxPooling2D(3, 2)]
        self.layer1 = BottleneckStage(64, 3, 1, groups, base_width, name="layer1")
        self.layer2 = BottleneckStage(128, 4, 2, groups, base_width, name="layer2")

    def build(self, input_shape):
        _build_chain(self.stem + [self.layer1, self.layer2], input_shape)

    def call(self, x, training=None):
        x = _run_chain(self.stem, x, training)
        return self.layer2(self.layer1(x, training=training), training=training)

    def keras_hub_names(self):
        """(name, layer) of each convolution and batch norm, named as in keras-hub's
        `ResNetBackbone`, whose bottleneck ResNet-50 is this network (torchvision's, the
        stride in the 3x3 convolution): `--init_from` of a keras-hub preset pairs them."""
        (conv,), (norm,) = _convs_and_norms(self.stem)
        return ([("conv1_conv", conv), ("conv1_bn", norm)] + _keras_hub_stage_names(self.layer1, 0)
                + _keras_hub_stage_names(self.layer2, 1))

    def keras_hub_config(self):
        """The `keras_hub.models.ResNetBackbone` arguments of the same network, or None for
        ResNeXt (keras-hub has none): what a plain `.weights.h5` file is read into."""
        if self.groups != 1 or self.base_width != 64:
            return None
        return dict(input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128, 256, 512],
                    stackwise_num_blocks=[3, 4, 6, 3], stackwise_num_strides=[1, 2, 2, 2],
                    block_type="bottleneck_block", use_pre_activation=False)

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

    def keras_hub_names(self):
        """As `ImageNetResNetTrunk.keras_hub_names`: layer3 and layer4 are keras-hub's stacks 2 and 3."""
        return _keras_hub_stage_names(self.layer3, 2) + _keras_hub_stage_names(self.layer4, 3)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "groups": self.groups,
                "base_width": self.base_width, "scale": self.scale}


def imagenet_resnet(groups, base_width):
    def build(num_classes, num_experts, scale):
        trunk = ImageNetResNetTrunk(groups, base_width, name="trunk")
        experts = [ImageNetResNetExpert(num_classes, groups, base_width, scale, name=f"expert{m}")
                   for m in range(num_experts)]
        return trunk, experts
    return build
