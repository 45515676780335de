"""The CIFAR ResNets (ResNet-8/20/32/56) of the reference: a shared trunk and one expert
per member (its last stages)."""

import keras
from keras import layers, ops

from balpoe_tf.models.layers import (BlockStack, CosineClassifier, PadShortcut, batch_norm, conv_batch_norm,
                                     conv_layers, strided_shape)


def conv3x3(filters, stride):
    """The reference CIFAR ResNet's 3x3 convolution (kaiming fan_in), as layers."""
    return conv_layers(filters, 3, stride, init_mode="fan_in", pad_at_stride_1=False)


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
        self.conv1 = conv3x3(filters, stride)
        self.bn1 = batch_norm()
        self.conv2 = conv3x3(filters, 1)
        self.bn2 = batch_norm()
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
        y = ops.relu(conv_batch_norm(self.conv1, self.bn1, x, training))
        y = conv_batch_norm(self.conv2, self.bn2, y, training)
        return ops.relu(y + (self.shortcut(x) if self.shortcut is not None else x))

    def compute_output_shape(self, input_shape):
        return strided_shape(input_shape, self.stride, self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "stride": self.stride}


@keras.saving.register_keras_serializable("balpoe_tf")
class ResNetStage(BlockStack):
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
        self.stem = conv3x3(width, 1)[0]
        self.stem_bn = batch_norm()
        self.stage1 = ResNetStage(width, _blocks_per_stage(depth), 1, name="stage1")

    def build(self, input_shape):
        self.stem.build(input_shape)
        shape = self.stem.compute_output_shape(input_shape)
        self.stem_bn.build(shape)
        self.stage1.build(shape)

    def call(self, x, training=None):
        x = ops.relu(conv_batch_norm([self.stem], self.stem_bn, x, training))
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


def cifar_resnet(depth, width=16):
    def build(num_classes, num_experts, scale):
        trunk = CifarResNetTrunk(depth, width, name="trunk")
        experts = [CifarResNetExpert(num_classes, depth, width, scale, name=f"expert{m}")
                   for m in range(num_experts)]
        return trunk, experts
    return build
