"""The BalPoE model: a backbone's trunk, M experts with cosine classifiers, and the
`train_step` that applies mixup and the logit-adjusted losses."""

import contextlib

import numpy as np

import keras
import tensorflow as tf
from keras import layers, ops

from balpoe_tf import metrics as lt_metrics
from balpoe_tf.training import mix, mixup_draw, mixup_loss
from balpoe_tf.models.cifar_resnet import cifar_resnet
from balpoe_tf.models.imagenet_resnet import imagenet_resnet


# One registry of backbones: name -> builder(num_classes, num_experts, scale).
BACKBONES = {
    "resnet32": cifar_resnet(32),
    "resnet20": cifar_resnet(20),
    "resnet8": cifar_resnet(8),
    "resnet50": imagenet_resnet(1, 64),
    "resnext50": imagenet_resnet(32, 4),
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
        if not self.compiled:
            return None  # saved as architecture and weights, as Keras saves any uncompiled model
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


def forward_function(model, jit_compile=False):
    """`images -> model(images, training=False)` (its outputs dict) as one traced graph,
    compiled with XLA if `jit_compile`."""
    return tf.function(lambda images: model(images, training=False), jit_compile=jit_compile, autograph=False)


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
    """
    previous = keras.mixed_precision.global_policy()
    if name:
        keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
