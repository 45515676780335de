"""The training task of a BalPoE network: `BalPoEModel`, the network compiled with the
logit-adjusted losses, trained by a `train_step` that applies mixup, and evaluated with the
long-tail metrics (in the spirit of keras-hub's Task around a Backbone), and built from a run's
settings (`build_model`).

The task extends the network rather than holding it, so that a saved model keeps its
variables where checkpoints written before the two were apart keep them (`trunk`,
`experts`): every existing `.keras` file loads as it is."""

import keras
import tensorflow as tf

from balpoe_tf import losses, training
from balpoe_tf import metrics as lt_metrics
from balpoe_tf.models import BalPoENetwork
from balpoe_tf.run_config import RunConfig
from balpoe_tf.training import mix, mixup_draw, mixup_loss


@keras.saving.register_keras_serializable("balpoe_tf")
class BalPoEModel(BalPoENetwork):
    """A `models.BalPoENetwork` with its training task: `compile` takes the
    `LogitAdjustedLoss` and the mixup alpha; `train_step` mixes each batch and minimises
    `xi * L(y) + (1 - xi) * L(y[perm])`, with the loss summed over the replica's examples and
    divided by the global batch, so gradients summed across replicas are those of the global
    mean; `test_step` updates the accuracy, shot-group, calibration and per-expert metrics.

    Args: those of `models.BalPoENetwork`.
    """

    def _make_state(self):
        # Metrics are state, which Keras wants created before the network is built;
        # `compile` gives the group metric its training counts.
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.expert_accuracy = lt_metrics.expert_accuracies(self.num_experts)
        self.nll = keras.metrics.Mean(name="nll")
        self.groups = lt_metrics.GroupAccuracy(self.num_classes)
        self.calibration = lt_metrics.CalibrationError()
        self.balpoe_loss = None

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


def make_schedule(config: RunConfig, steps_per_epoch: int):
    """The per-epoch LR schedule of a run's settings: warm-up and steps, or cosine."""
    if config.schedule == "step":
        return training.WarmupStepSchedule(config.lr, steps_per_epoch, config.warmup_epochs,
                                           config.milestones, config.gamma)
    return training.EpochCosineSchedule(config.lr, steps_per_epoch, config.epochs, config.warmup_epochs)


def build_model(config: RunConfig, data, steps_per_epoch: int, initialise=None) -> "BalPoEModel":
    """A compiled BalPoE model for `config` and `data` (a `data.LabeledData`: classes, image
    shape, training counts); call it inside the strategy scope.

    Args:
        config, data, steps_per_epoch: the run's settings, data and steps per epoch.
        initialise: `model -> indices` that loads pretrained weights into the new model and
            returns their indices in its `trainable_variables`, which then train with
            `--pretrained_lr_factor` after `--frozen_epochs` (e.g. `pretrained.initialise`).
    """
    model = BalPoEModel(data.num_classes, config.num_experts, config.backbone, config.scale,
                        input_shape=data.image_shape, sync_bn=config.sync_bn)
    pretrained = initialise(model) if initialise else ()
    optimizer = training.SGDWithL2(make_schedule(config, steps_per_epoch), config.momentum,
                                   config.nesterov, config.weight_decay, pretrained, config.pretrained_lr_factor,
                                   config.frozen_epochs * steps_per_epoch)
    if config.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    loss = losses.LogitAdjustedLoss(data.train_counts(), config.lambdas, config.target_mean_lambda)
    model.compile(optimizer, loss, mixup_alpha=config.mixup_alpha, seed=config.seed,
                  jit_compile=config.jit_compile)
    return model


def lr_schedule(model):
    """The per-epoch schedule object behind the model's optimizer."""
    optimizer = model.optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    # Keras exposes only the current LR value publicly; the schedule is `_learning_rate`.
    return optimizer._learning_rate
