"""The BalPoE network: a backbone's trunk and M experts with cosine classifiers, the backbone
registry, the forward pass over a dataset and the precision policy networks are made in."""

import contextlib

import numpy as np

import keras
import tensorflow as tf
from keras import layers, ops

from balpoe_tf import precision
from balpoe_tf.models.cifar_resnet import cifar_resnet
from balpoe_tf.models.hub import hub_network
from balpoe_tf.models.imagenet_resnet import imagenet_resnet
from balpoe_tf.names import HUB_PREFIX


# One registry of backbones: name -> builder(num_classes, num_experts, scale).
BACKBONES = {
    "resnet32": cifar_resnet(32),
    "resnet20": cifar_resnet(20),
    "resnet8": cifar_resnet(8),
    "resnet50": imagenet_resnet(1, 64),
    "resnext50": imagenet_resnet(32, 4),
}


@keras.saving.register_keras_serializable("balpoe_tf")
class BalPoENetwork(keras.Model):
    """The network of a Balanced Product of Experts: a shared trunk and M experts whose logits
    are averaged. Training it (mixup, the logit-adjusted losses, metrics) is the task's,
    `task.BalPoEModel`, which extends it.

    `call` returns a dict with `logits` (B, C), the mean of the expert logits, and
    `expert_logits` (B, M, C).

    Args:
        num_classes: number of classes C.
        num_experts: M >= 1.
        backbone: a key of `BACKBONES`.
        scale: cosine-classifier scale.
        input_shape: `(H, W, C)` of the images; the network is built for it.
        sync_bn: under tf.distribute, compute batch-norm statistics over the global
            batch (synchronised) instead of each replica's share.
    """

    def __init__(self, num_classes, num_experts=3, backbone="resnet32", scale=30.0,
                 input_shape=(32, 32, 3), sync_bn=False, hub_config=None, **kwargs):
        super().__init__(**kwargs)
        if int(num_experts) < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts}")
        if backbone not in BACKBONES and not backbone.startswith(HUB_PREFIX):
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)} or {HUB_PREFIX}PRESET")
        self.num_classes, self.num_experts = int(num_classes), int(num_experts)
        self.backbone, self.scale = backbone, float(scale)
        self.image_shape, self.sync_bn = tuple(input_shape), bool(sync_bn)
        if backbone.startswith(HUB_PREFIX):
            self.trunk, self.experts, self.hub_config = hub_network(
                backbone[len(HUB_PREFIX):], self.num_classes, self.num_experts, self.scale, self.image_shape,
                hub_config)
        else:
            self.trunk, self.experts = BACKBONES[backbone](self.num_classes, self.num_experts, self.scale)
            self.hub_config = None
        self._make_state()
        self.build((None,) + self.image_shape)

    def _make_state(self):
        """State a subclass needs before the network is built (Keras takes none after)."""

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

    def get_config(self):
        return {"name": self.name, "num_classes": self.num_classes, "num_experts": self.num_experts,
                "backbone": self.backbone, "scale": self.scale, "input_shape": self.image_shape,
                "sync_bn": self.sync_bn, "hub_config": self.hub_config}


def forward_function(model, jit_compile=False):
    """`images -> model(images, training=False)` (its outputs dict) as one traced graph,
    compiled with XLA if `jit_compile`. Traced once, for any batch size: a split's last batch
    is smaller, and a trace per size made TensorFlow warn of retracing."""
    signature = [tf.TensorSpec((None, *model.image_shape), tf.float32)]
    return tf.function(lambda images: model(images, training=False), input_signature=signature,
                       jit_compile=jit_compile, autograph=False)


def predict_dataset(model, dataset, progress=None):
    """Labels, ensemble logits `(N, C)` and expert logits `(N, M, C)` of every
    `(images, labels)` batch of `dataset`, as NumPy arrays.

    Args:
        model: a `BalPoEModel`.
        dataset: batches of `(images, labels)`.
        progress: told each finished step (`progress.update(step)`), e.g. a `Progress`.
    """
    forward = forward_function(model)
    labels, logits, experts = [], [], []
    for step, (images, y) in enumerate(dataset, 1):
        out = forward(images)
        if progress is not None:
            progress.update(step)
        labels.append(y.numpy())
        logits.append(out["logits"].numpy())
        experts.append(out["expert_logits"].numpy())
    return np.concatenate(labels), np.concatenate(logits), np.concatenate(experts)


def count_params(layer) -> int:
    """Number of trainable + non-trainable scalars of a built layer or model."""
    return int(sum(np.prod(w.shape) for w in layer.weights))


@contextlib.contextmanager
def precision_policy(name: str):
    """Models made (or loaded) inside the block compute in Keras precision policy `name`;
    the global policy is restored after it.

    Args:
        name: a Keras policy ("float32", "mixed_bfloat16", ...); "" keeps the current one.

    Raises:
        RunError: TensorFlow has no kernel for `name` in this process (`precision.kernel_problem`).
    """
    previous = keras.mixed_precision.global_policy()
    if name:
        precision.require_kernels(name)
        keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
