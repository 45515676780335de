"""keras-hub backbones as BalPoE networks (`--backbone=hub:PRESET`), with the preset's weights.

keras-hub (the maintained successor of keras-cv) is an optional extra, `pip install -e ".[hub]"`,
imported only here and only when a hub backbone is asked for. PRESET is a keras-hub preset name
(downloaded by keras-hub on first use) or a local preset folder (`Backbone.save_to_preset`).

How the preset becomes a trunk and M experts:
- a ResNet (`keras_hub.models.ResNetBackbone`) is split where the paper splits ResNets: the
  stages before the last two are the shared trunk, and each expert is a copy of the last two
  stages (initialised from the preset, then trained apart), global average pooling and a cosine
  classifier;
- any other family (or a ResNet of fewer than three stages) is the shared trunk whole, and each
  expert is a small head: global average pooling of its features, a dense layer of as many units
  with ReLU (new weights), and a cosine classifier.

A saved network keeps the backbone's configuration, not the preset's name: loading a checkpoint
needs keras-hub but no preset, and an exported SavedModel needs neither.
"""

import keras
from keras import layers

from balpoe_tf.config import error_line, RunError
from balpoe_tf.models.layers import CosineClassifier
from balpoe_tf.names import HUB_PREFIX


def keras_hub(flag: str = f"--backbone={HUB_PREFIX}PRESET"):
    """The keras_hub module, or a one-line error saying that `flag` needs the extra that installs it."""
    try:
        import keras_hub as module
    except ImportError:
        raise RunError(f"{flag} needs keras-hub, an optional extra: pip install -e \".[hub]\"") from None
    return module


def from_preset(preset: str, flag: str, dtype: str):
    """The keras-hub backbone of `preset` (a name or a folder), with its weights, computing in
    `dtype`; a preset keras-hub cannot load is a `RunError` naming `flag`."""
    hub = keras_hub(flag)
    try:
        return hub.models.Backbone.from_preset(preset, dtype=dtype)
    except Exception as e:  # keras-hub reports a missing or foreign preset in several error types
        raise RunError(f"{flag}: keras-hub cannot load this preset ({error_line(e)}): pass a keras-hub preset "
                       "name or a folder written by save_to_preset") from None


def load_backbone(preset: str = "", config=None):
    """A keras-hub backbone computing in the global precision policy: `preset`'s, with its
    weights, or (for a saved network) one made from its serialized `config`, without them."""
    dtype = keras.mixed_precision.global_policy().name
    if config is None:
        return from_preset(preset, f"--backbone={HUB_PREFIX}{preset}", dtype)
    keras_hub()  # registers keras-hub's classes, which the configuration names
    config = {**config, "config": {**config["config"], "dtype": dtype}}
    return keras.saving.deserialize_keras_object(config)


def _resnet_cut(backbone):
    """The layer whose output the trunk ends at in a keras-hub ResNet, or None (not a ResNet, or
    too few stages to keep two for the experts)."""
    config = backbone.get_config()
    blocks = config.get("stackwise_num_blocks")
    if not isinstance(backbone, keras_hub().models.ResNetBackbone) or not blocks or len(blocks) < 3:
        return None
    stack = len(blocks) - 3
    return backbone.get_layer(f"stack{stack}_block{blocks[stack] - 1}_out")


class HubExpert(layers.Layer):
    """One expert on a keras-hub trunk: its own copy of the backbone's last stages (`body`, a
    functional model) or a dense head, then global average pooling and a cosine classifier.
    Not serialized alone: its network rebuilds it from the backbone's configuration.

    Args:
        body: the expert's stages, a Keras model from the trunk's features, or None.
        head_units: units of the dense ReLU layer after pooling (0: none).
        num_classes: classes C.
        scale: cosine-classifier scale.
    """

    def __init__(self, body, head_units, num_classes, scale=30.0, **kwargs):
        super().__init__(**kwargs)
        self.body, self.head_units, self.num_classes, self.scale = body, int(head_units), num_classes, scale
        self.pool = None
        self.head = layers.Dense(self.head_units, activation="relu", name="head") if self.head_units else None
        self.classifier = CosineClassifier(num_classes, scale, name="classifier")

    def build(self, input_shape):
        shape = self.body.compute_output_shape(input_shape) if self.body is not None else input_shape
        self.pool = layers.GlobalAveragePooling2D() if len(shape) == 4 else layers.GlobalAveragePooling1D()
        shape = (shape[0], shape[-1])
        if self.head is not None:
            self.head.build(shape)
            shape = (shape[0], self.head_units)
        self.classifier.build(shape)
        self.built = True

    def call(self, features, training=None):
        x = self.body(features, training=training) if self.body is not None else features
        x = self.pool(x)
        if self.head is not None:
            x = self.head(x)
        return self.classifier(x)


def hub_network(preset: str, num_classes: int, num_experts: int, scale: float, input_shape, config=None):
    """`(trunk, experts, backbone config)` of a keras-hub backbone (module docstring).

    Args:
        preset: the keras-hub preset (name or folder); unused when `config` is given.
        num_classes, num_experts, scale: as `BalPoENetwork`'s.
        input_shape: `(H, W, C)` of the images.
        config: a saved network's backbone configuration (its weights come from the checkpoint).
    """
    backbone = load_backbone(preset, config)
    cut = _resnet_cut(backbone)
    if cut is None:
        images = keras.Input(input_shape)
        features = backbone(images)
        trunk = keras.Model(images, features, name="trunk")
        units = int(features.shape[-1])
        experts = [HubExpert(None, units, num_classes, scale, name=f"expert{m}") for m in range(num_experts)]
    else:
        trunk = keras.Model(backbone.input, cut.output, name="trunk")
        body = keras.Model(cut.output, backbone.output)
        bodies = [body] + [keras.models.clone_model(body) for _ in range(num_experts - 1)]
        for copy in bodies[1:]:
            copy.set_weights(body.get_weights())
        experts = [HubExpert(b, 0, num_classes, scale, name=f"expert{m}") for m, b in enumerate(bodies)]
    return trunk, experts, keras.saving.serialize_keras_object(backbone)
