"""Layers the backbones share: fused batch norm, the cosine classifier, the option-A
shortcut, and the PyTorch-matching initialisers and convolution helper."""

import keras
import tensorflow as tf
from keras import layers, ops


def kaiming_normal(mode: str = "fan_in"):
    """PyTorch's `kaiming_normal_` (ReLU gain): the reference CIFAR ResNets use fan_in, its
    ImageNet ResNets fan_out (N(0, 2 / (k * k * out_channels)))."""
    return keras.initializers.VarianceScaling(2.0, mode, "untruncated_normal")


@keras.saving.register_keras_serializable("balpoe_tf")
class FusedBatchNormalization(layers.BatchNormalization):
    """`BatchNormalization` on NHWC images computed by TensorFlow's fused kernel.

    Keras 3 normalises with separate moment, subtract, scale and shift ops; with the
    fused kernel (one op forward, one backward) the 3-expert ResNet-32 trains about 1.4x
    as fast on CPU (docs/performance.md). Same weights, same outputs. The moving variance is
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


def conv_batch_norm(convolution, bn, x, training=None):
    """`bn(convolution(x))`, with `convolution` the layers of `conv_layers`.

    At inference the batch norm is folded into the convolution (kernel * s, bias
    beta - mean * s, s = gamma / sqrt(var + eps)), which TensorFlow's graph optimiser
    then fuses with a following residual addition and ReLU into one kernel: the 3-expert
    ResNet-32 predicts about 4 % faster, its exported SavedModel too (docs/performance.md).
    Training, and batch norms this cannot fold (synchronised, not fused), are unchanged.

    Args:
        convolution: `[ZeroPadding2D, Conv2D]` or `[Conv2D]`, the Conv2D without bias.
        bn: the batch norm that follows it.
        x: NHWC input.
        training: batch statistics (no folding) when true.

    Returns:
        The batch norm's output.
    """
    conv = convolution[-1]
    if training or conv.use_bias or not isinstance(bn, FusedBatchNormalization) or bn.synchronized:
        for layer in convolution:
            x = layer(x)
        return bn(x, training=training)
    for layer in convolution[:-1]:
        x = layer(x)
    scale = bn.gamma * ops.rsqrt(bn.moving_variance + bn.epsilon)
    kernel = ops.cast(conv.kernel * scale, x.dtype)
    bias = ops.cast(bn.beta - bn.moving_mean * scale, x.dtype)
    y = tf.nn.conv2d(x, kernel, strides=conv.strides, padding=conv.padding.upper(), dilations=conv.dilation_rate)
    return tf.nn.bias_add(y, bias)


def batch_norm():
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


def strided_shape(input_shape, stride, filters):
    """NHWC shape after a stride-`stride` layer with `filters` output channels."""
    b, h, w, _ = input_shape
    size = lambda n: None if n is None else -(-n // stride)  # noqa: E731
    return (b, size(h), size(w), filters)


def subsample(x, stride):
    """`x[:, ::stride, ::stride, :]` of an NHWC tensor.

    When the height and width are multiples of the stride, it is a reshape and a slice: the
    gradient of a strided slice runs 4-5x slower here than that of a slice (a pad); the
    3-expert ResNet-32 trains 1.5 % faster (docs/performance.md).
    """
    _, h, w, c = x.shape
    if h is None or w is None or h % stride or w % stride:
        return x[:, ::stride, ::stride, :]
    blocks = ops.reshape(x, (-1, h // stride, stride, w // stride, stride * c))
    first = ops.slice(blocks, (0, 0, 0, 0, 0), (ops.shape(x)[0], h // stride, 1, w // stride, c))
    return ops.reshape(first, (-1, h // stride, w // stride, c))


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
            x = subsample(x, self.stride)
        extra = self.filters - x.shape[-1]
        return ops.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])

    def compute_output_shape(self, input_shape):
        return strided_shape(input_shape, self.stride, self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "stride": self.stride}


def conv_layers(filters, kernel, stride=1, groups=1, init_mode="fan_out", pad_at_stride_1=True):
    """A bias-free convolution with PyTorch's padding (kernel // 2 on each side), as layers.

    An explicit zero padding keeps PyTorch's sampling grid for stride 2 (TF "same" would
    shift it by one pixel); at stride 1 "same" is the same grid, and the CIFAR ResNets
    (`pad_at_stride_1=False`) use it, as their checkpoints record.

    Args:
        filters: output channels.
        kernel: square kernel size (odd).
        stride: stride.
        groups: channel groups (32 for ResNeXt).
        init_mode: `kaiming_normal` mode.
        pad_at_stride_1: pad explicitly at stride 1 too.

    Returns:
        `[ZeroPadding2D, Conv2D]` or `[Conv2D]`.
    """
    pad = kernel // 2
    if pad and stride == 1 and not pad_at_stride_1:
        return [layers.Conv2D(filters, kernel, padding="same", groups=groups, use_bias=False,
                              kernel_initializer=kaiming_normal(init_mode))]
    conv = layers.Conv2D(filters, kernel, strides=stride, padding="valid", groups=groups,
                         use_bias=False, kernel_initializer=kaiming_normal(init_mode))
    return [layers.ZeroPadding2D(pad), conv] if pad else [conv]


class BlockStack(layers.Layer):
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
