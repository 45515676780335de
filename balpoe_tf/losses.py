"""The BalPoE training objective: per-expert logit-adjusted cross-entropy."""

import warnings

import numpy as np

import keras
from keras import ops

from balpoe_tf.data.longtail import class_prior

# Added inside the log, as the reference does, so the prior of a rare class stays finite.
LOG_PRIOR_EPS = 1e-9


def check_lambdas(lambdas, target_mean=0.0, tolerance=1e-6):
    """Validate the experts' lambda values.

    Args:
        lambdas: one lambda per expert (tau = 1 - lambda).
        target_mean: the mean lambda the ensemble should have (0 gives the balanced,
            Fisher-consistent ensemble); a different mean only warns, because some
            published settings (ImageNet-LT: mean -0.25) deliberately tilt it.
        tolerance: how far the mean may be from the target without a warning.

    Returns:
        The lambdas as a float64 array.
    """
    values = np.asarray(lambdas, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("lambdas is empty: give one lambda per expert, e.g. 1,0,-1")
    if abs(values.mean() - target_mean) > tolerance:
        warnings.warn(
            f"mean lambda is {values.mean():g}, not the target {target_mean:g}: the ensemble "
            f"then targets the prior pi^{values.mean():g} instead of pi^{target_mean:g} "
            "(lambda_bar = 0 is the balanced, Fisher-consistent ensemble); set "
            "--target_mean_lambda if this is intended",
            stacklevel=3,
        )
    return values


@keras.saving.register_keras_serializable("balpoe_tf")
class LogitAdjustedLoss(keras.losses.Loss):
    """Mean over experts of softmax cross-entropy on `logits_m + tau_m * log(pi)`.

    With tau_m = 1 - lambda_m: lambda = 1 is plain cross-entropy, lambda = 0 balanced
    softmax, lambda = -1 an inverse-prior (tail) expert.

    Args:
        class_counts: training images per class; the prior is pi = counts / sum.
        lambdas: one lambda per expert.
        target_mean_lambda: expected mean lambda (a warning when it differs).
    """

    def __init__(self, class_counts, lambdas, target_mean_lambda=0.0,
                 reduction="sum_over_batch_size", name="logit_adjusted_loss", **kwargs):
        super().__init__(reduction=reduction, name=name, **kwargs)
        self.class_counts = [int(c) for c in class_counts]
        self.lambdas = check_lambdas(lambdas, target_mean=target_mean_lambda).tolist()
        self.target_mean_lambda = float(target_mean_lambda)
        log_prior = np.log(class_prior(self.class_counts) + LOG_PRIOR_EPS)
        taus = 1.0 - np.asarray(self.lambdas)
        # (M, C) additive bias of each expert's logits.
        self._bias = (taus[:, None] * log_prior[None, :]).astype(np.float32)

    @property
    def num_experts(self):
        return len(self.lambdas)

    def call(self, y_true, y_pred):
        """Per-example loss.

        Args:
            y_true: `(B,)` integer labels.
            y_pred: `(B, M, C)` expert logits.

        Returns:
            `(B,)` loss, averaged over the experts.
        """
        if y_pred.shape[1] is not None and y_pred.shape[1] != self.num_experts:
            raise ValueError(f"loss has {self.num_experts} lambdas but the model has "
                             f"{y_pred.shape[1]} experts")
        adjusted = ops.cast(y_pred, "float32") + ops.convert_to_tensor(self._bias)
        labels = ops.cast(ops.reshape(y_true, (-1, 1)), "int32")
        labels = ops.broadcast_to(labels, ops.shape(adjusted)[:2])
        per_expert = keras.losses.sparse_categorical_crossentropy(labels, adjusted, from_logits=True)
        return ops.mean(per_expert, axis=1)

    def get_config(self):
        return {**super().get_config(), "class_counts": self.class_counts,
                "lambdas": self.lambdas, "target_mean_lambda": self.target_mean_lambda}
