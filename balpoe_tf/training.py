"""Optimisation pieces of the reference recipe: SGD with L2 weight decay and Nesterov
momentum as PyTorch applies them, per-epoch learning-rate schedules, and mixup."""

import math

import keras
import tensorflow as tf
from keras import ops


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite; the message says where (epoch,
    step, learning rate) and which checkpoint is the last good one."""


@keras.saving.register_keras_serializable("balpoe_tf")
class SGDWithL2(keras.optimizers.Optimizer):
    """SGD with momentum and L2 weight decay, with PyTorch's `torch.optim.SGD` semantics.

    Per variable w with gradient g:

        g = g + weight_decay * w          # L2, before momentum (not decoupled)
        buf = momentum * buf + g
        step = g + momentum * buf  if nesterov else buf
        w = w - lr * step

    Keras' own SGD keeps `lr * g` in its velocity, which differs from this after a
    learning-rate change, and its `weight_decay` is decoupled, so it is not used.

    Fine-tuning: the `pretrained` variables' `g` (L2 included) is multiplied by 0 during the
    first `frozen_steps` steps, then by `pretrained_lr_factor`. With the momentum buffer starting
    at zero this is the same as their learning rate times that factor, and frozen means frozen:
    nothing accumulates in the buffer to move them later.

    Args:
        learning_rate: float or schedule.
        momentum: momentum factor.
        nesterov: Nesterov momentum.
        l2: L2 weight-decay coefficient, applied to every variable (as the reference,
            which decays BN and classifier weights too).
        pretrained: indices, in the variables the optimizer is built with, of the pretrained ones.
        pretrained_lr_factor: their learning-rate factor once unfrozen.
        frozen_steps: steps at the start during which they are not updated.
    """

    def __init__(self, learning_rate=0.1, momentum=0.9, nesterov=True, l2=5e-4, pretrained=(),
                 pretrained_lr_factor=1.0, frozen_steps=0, name="sgd_with_l2", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum, self.nesterov, self.l2 = float(momentum), bool(nesterov), float(l2)
        self.pretrained = sorted(int(i) for i in pretrained)
        self.pretrained_lr_factor, self.frozen_steps = float(pretrained_lr_factor), int(frozen_steps)
        self._pretrained = set(self.pretrained)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.buffers = self.add_optimizer_variables(variables, "momentum_buffer")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        if self.l2:
            g = g + self.l2 * variable
        if self._pretrained and self._get_variable_index(variable) in self._pretrained:
            factor = ops.where(self.iterations < self.frozen_steps, 0.0, self.pretrained_lr_factor)
            g = g * ops.cast(factor, variable.dtype)
        if not self.momentum:
            self.assign_sub(variable, lr * g)
            return
        # Keras's own SGD finds a variable's slot this way; there is no public lookup.
        buf = self.buffers[self._get_variable_index(variable)]
        # TensorFlow's momentum kernel is the update above (Nesterov: w -= lr * g + lr * m * buf) in one
        # op instead of seven per variable; the 3-expert ResNet-32 trains 1.4 % faster (docs/performance.md).
        tf.raw_ops.ResourceApplyMomentum(var=variable.handle, accum=buf.handle, lr=lr, grad=g,
                                         momentum=ops.cast(self.momentum, variable.dtype),
                                         use_nesterov=self.nesterov)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov, "l2": self.l2,
                "pretrained": self.pretrained, "pretrained_lr_factor": self.pretrained_lr_factor,
                "frozen_steps": self.frozen_steps}


class EpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning rate that changes once per epoch, with an optional linear warm-up:
    during the first `warmup_epochs` epochs the LR is scaled by (e + 1) / warmup_epochs.

    Subclasses give `decayed_lr(epoch)`, the LR of a 0-based epoch without warm-up.
    """

    def __init__(self, base_lr, steps_per_epoch, warmup_epochs=0):
        self.base_lr, self.steps_per_epoch = float(base_lr), int(steps_per_epoch)
        self.warmup_epochs = int(warmup_epochs)

    def decayed_lr(self, epoch):
        raise NotImplementedError

    def epoch_lr(self, epoch):
        """LR of a 0-based epoch, as a tensor."""
        epoch = tf.cast(epoch, tf.float32)
        lr = self.decayed_lr(epoch)
        if self.warmup_epochs > 0:
            lr *= tf.minimum((epoch + 1.0) / self.warmup_epochs, 1.0)
        return lr

    def __call__(self, step):
        return self.epoch_lr(tf.math.floordiv(tf.cast(step, tf.int64), self.steps_per_epoch))

    def get_config(self):
        return {"base_lr": self.base_lr, "steps_per_epoch": self.steps_per_epoch,
                "warmup_epochs": self.warmup_epochs}


@keras.saving.register_keras_serializable("balpoe_tf")
class WarmupStepSchedule(EpochSchedule):
    """The reference "CustomLR", stepped once per epoch.

    For 0-based epoch e: factor = gamma^(number of milestones <= e); during warm-up
    (e < warmup_epochs) it is multiplied by (e + 1) / warmup_epochs. With base 0.1,
    warm-up 5 and milestones 160, 180: epochs 1..5 (1-based) run at 0.02 .. 0.1,
    161..180 at 0.01, 181..200 at 0.001.

    Args:
        base_lr: learning rate after warm-up.
        steps_per_epoch: optimizer steps per epoch.
        warmup_epochs: linear warm-up length.
        milestones: 0-based epochs at which the LR is multiplied by gamma.
        gamma: decay factor.
    """

    def __init__(self, base_lr, steps_per_epoch, warmup_epochs=0, milestones=(), gamma=0.1):
        super().__init__(base_lr, steps_per_epoch, warmup_epochs)
        self.milestones, self.gamma = [int(m) for m in milestones], float(gamma)

    def decayed_lr(self, epoch):
        decays = sum(tf.cast(epoch >= m, tf.float32) for m in self.milestones)
        return self.base_lr * tf.pow(self.gamma, tf.cast(decays, tf.float32))

    def get_config(self):
        return {**super().get_config(), "milestones": self.milestones, "gamma": self.gamma}


@keras.saving.register_keras_serializable("balpoe_tf")
class EpochCosineSchedule(EpochSchedule):
    """Cosine annealing to 0 over `epochs`, stepped once per epoch
    (PyTorch `CosineAnnealingLR(T_max=epochs, eta_min=0)`): lr = base * (1 + cos(pi e / T)) / 2.

    Args:
        base_lr: initial learning rate.
        steps_per_epoch: optimizer steps per epoch.
        epochs: T_max.
        warmup_epochs: optional linear warm-up, as in `WarmupStepSchedule`.
    """

    def __init__(self, base_lr, steps_per_epoch, epochs, warmup_epochs=0):
        super().__init__(base_lr, steps_per_epoch, warmup_epochs)
        self.epochs = int(epochs)

    def decayed_lr(self, epoch):
        return 0.5 * self.base_lr * (1.0 + tf.cos(math.pi * epoch / self.epochs))

    def get_config(self):
        return {**super().get_config(), "epochs": self.epochs}


def _stateless_log_gamma(alpha, shape, seed, candidates=32):
    """log of Gamma(alpha, 1) draws (Marsaglia-Tsang), from a stateless seed.

    Written with stateless uniforms and normals only, so it also compiles with XLA
    (`tf.random.stateless_gamma` does not). Each draw takes the first of `candidates`
    proposals that is accepted; the chance that none is, below 0.05^32, is ignored.
    For alpha < 1, Gamma(alpha) = Gamma(alpha + 1) * U^(1 / alpha), kept in log space
    so small alphas do not underflow.
    """
    boost = alpha < 1.0
    a = alpha + 1.0 if boost else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    s_norm, s_unif, s_boost = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    x = tf.random.stateless_normal(list(shape) + [candidates], s_norm)
    u = tf.random.stateless_uniform(list(shape) + [candidates], s_unif, minval=1e-12)
    v = (1.0 + c * x) ** 3
    safe_v = tf.maximum(v, 1e-12)
    accept = (v > 0) & (tf.math.log(u) < 0.5 * x * x + d - d * safe_v + d * tf.math.log(safe_v))
    first = tf.argmax(tf.cast(accept, tf.int32), axis=-1)
    log_g = tf.math.log(d) + tf.math.log(tf.gather(safe_v, first, batch_dims=len(shape)))
    if boost:
        log_g += tf.math.log(tf.random.stateless_uniform(shape, s_boost, minval=1e-30)) / alpha
    return log_g


def mixup_draw(alpha, batch_size, seed):
    """One mixup coefficient and a batch permutation, from a stateless seed.

    Args:
        alpha: Beta(alpha, alpha) parameter; alpha <= 0 turns mixup off (xi = 1 and the
            identity permutation), since Beta(0, 0) is undefined.
        batch_size: scalar batch size.
        seed: `(2,)` int seed, e.g. `(run seed, optimizer step)`.

    Returns:
        `(xi, permutation)`: float32 scalar in [0, 1] and `(batch_size,)` int32 indices.
    """
    if alpha <= 0:
        return tf.constant(1.0), tf.range(batch_size, dtype=tf.int32)
    s_beta, s_perm = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    # Beta(a, a) = G1 / (G1 + G2) = sigmoid(log G1 - log G2) with G ~ Gamma(a).
    log_g = _stateless_log_gamma(float(alpha), [2], s_beta)
    xi = tf.sigmoid(log_g[0] - log_g[1])
    # argsort of uniform keys: a uniform permutation that XLA can compile, unlike StatelessShuffle.
    perm = tf.cast(tf.argsort(tf.random.stateless_uniform([batch_size], s_perm)), tf.int32)
    return xi, perm


def mix(images, xi, perm):
    """`xi * images + (1 - xi) * images[perm]`."""
    images = tf.convert_to_tensor(images)
    xi = tf.cast(xi, images.dtype)
    return xi * images + (1.0 - xi) * tf.gather(images, perm)


def mixup_loss(loss, labels, expert_logits, xi, perm):
    """Per-example mixup objective `xi * L(y) + (1 - xi) * L(y[perm])`.

    Args:
        loss: a `LogitAdjustedLoss` (its per-example `call` is used).
        labels: `(B,)` labels of the unmixed batch.
        expert_logits: `(B, M, C)` logits of the mixed batch.
        xi: mixing coefficient.
        perm: `(B,)` permutation the batch was mixed with.

    Returns:
        `(B,)` losses.
    """
    return (xi * loss.call(labels, expert_logits)
            + (1.0 - xi) * loss.call(tf.gather(labels, perm), expert_logits))
