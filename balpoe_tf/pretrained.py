"""Starting a run from what a network already knows (`--init_from`): the trunk and the experts'
stages of a trained network copied into a new one, tensor by tensor where the shapes match; the
cosine classifiers are always new (the classes are others).

Sources of this project: a run folder of tools/train.py (its final model, else its newest
checkpoint), a `.keras` file of a BalPoE network or model, or a `.weights.h5` file written by
`save_weights` of one. Source and run must have the same `--backbone`: the tensors are paired by
their place in the trunk and in each expert, which only the same architecture makes meaningful.
Expert m of the run starts from expert m of the source, or from expert m mod M' when the source
has fewer (M'), so that a one-expert network seeds every expert.

Plain backbones, for `--backbone=resnet50`: a keras-hub preset (a name, or a folder written by
`save_to_preset`), a `.keras` file of a keras-hub ResNet (or of a model holding one), or a
`.weights.h5` file of keras-hub's ResNet-50. keras-hub's bottleneck ResNet is torchvision's, as
ours is, so its layers pair with ours by name (`keras_hub_names`): the stem and stacks 0-1 fill the
trunk, stacks 2-3 every expert's last stages.

A network on a keras-hub backbone (`--backbone=hub:PRESET`) takes its preset's weights when it is
made; `preset_report` reports them the same way.
"""

import dataclasses
import os
import warnings
import zipfile
from typing import List, Tuple

import keras
import numpy as np

from balpoe_tf.config import error_line, RunError
from balpoe_tf.models import BalPoENetwork
from balpoe_tf.models.hub import from_preset, keras_hub
from balpoe_tf.names import HUB_PREFIX
from balpoe_tf.run_folder import latest_checkpoint, load_model_file, read_record, RunFolder

# A source that fills less than this share of the run's parameters outside the classifiers is
# refused: it is almost certainly not the network meant.
MIN_LOADED_SHARE = 0.5

# How many tensors left at their initial values a report names.
NAMED = 5

SOURCES = ("pass a run folder of tools/train.py, a .keras or .weights.h5 file, or a keras-hub preset (a name, or "
           "a folder written by save_to_preset)")


@dataclasses.dataclass
class InitReport:
    """What `--init_from` loaded.

    Attributes:
        source: the file the weights came from.
        loaded_tensors, loaded_params: what was copied.
        total_tensors, total_params: the run's tensors outside the classifiers.
        left: (tensor, why) of each one left at its initial value (shape, missing in the source).
        pretrained: indices, in the model's `trainable_variables`, of the tensors copied: the
            part `--pretrained_lr_factor` and `--frozen_epochs` act on.
    """

    source: str
    loaded_tensors: int
    loaded_params: int
    total_tensors: int
    total_params: int
    left: List[Tuple[str, str]]
    pretrained: List[int]

    def summary(self) -> str:
        """One line for the run's log."""
        left = (f"; {len(self.left)} left at their initial values: "
                + ", ".join(f"{name} ({why})" for name, why in self.left[:NAMED])
                + (" ..." if len(self.left) > NAMED else "")) if self.left else ""
        return (f"init_from {self.source}: loaded {self.loaded_tensors} of {self.total_tensors} tensors, "
                f"{self.loaded_params:,} of {self.total_params:,} parameters outside the classifiers (new: "
                f"other classes){left}")

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "pretrained"} | {
            "left": [{"tensor": name, "why": why} for name, why in self.left]}


def _source_file(path: str) -> str:
    """The model file `path` names: itself, or a run folder's final model or newest checkpoint."""
    if os.path.isdir(path):
        folder = RunFolder(path)
        if read_record(path) is None:
            raise RunError(f"--init_from={path} is a folder without a run's config.json or a preset's "
                           f"metadata.json: {SOURCES}")
        if os.path.isfile(folder.model):
            return folder.model
        _, checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise RunError(f"--init_from={path} holds no trained model yet (no model.keras, no checkpoint)")
        return checkpoint
    if not os.path.isfile(path):
        raise RunError(f"--init_from={path} does not exist: {SOURCES}")
    return path


def _check_takes_plain(path: str, like: BalPoENetwork):
    """Refuse, before anything is loaded, a run whose backbone has no keras-hub counterpart."""
    if like.backbone.startswith(HUB_PREFIX):
        raise RunError(f"--init_from={path} is a plain backbone, and --backbone={like.backbone} takes its weights "
                       f"from its own preset: pass --backbone={HUB_PREFIX}{path} without --init_from, or a run "
                       f"folder or model file of this project with --backbone={like.backbone}")
    if not hasattr(like.trunk, "keras_hub_names"):
        what = ("names no file or folder here, so it is read as a keras-hub preset" if _is_preset_name(path) else
                "is a plain backbone (a keras-hub preset, or a Keras file that is not a BalPoE network)")
        raise RunError(f"--init_from={path} {what}, and --backbone={like.backbone} has no keras-hub counterpart to "
                       "take it from: pass --backbone=resnet50 (keras-hub's ResNet-50), or a run folder or model "
                       f"file of this project with --backbone={like.backbone}")


def _plain_weights_file(path: str, like: BalPoENetwork) -> keras.Model:
    """keras-hub's ResNet-50 with the weights of `path`, a plain backbone's `save_weights` file
    (which holds no architecture: that of `like`'s keras-hub counterpart is assumed)."""
    _check_takes_plain(path, like)
    config = like.trunk.keras_hub_config()
    if config is None:
        raise RunError(f"--init_from={path} holds a plain backbone's weights without its network, and keras-hub "
                       f"has no {like.backbone} to read them into: pass a .keras file or a preset folder, which "
                       "carry their network")
    hub = keras_hub(f"--init_from={path} (a plain backbone's weights)")
    backbone = hub.models.ResNetBackbone(**config, image_shape=(None, None, like.image_shape[-1]), dtype="float32")
    # Keras loads a file of another network in part, warning of each part skipped: that is a
    # mismatch too, as much as the errors it raises.
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        try:
            backbone.load_weights(path)
            problem = str(skipped[0].message) if skipped else ""
        except Exception as e:  # Keras names a mismatch in several error types
            problem = error_line(e)
    if problem:
        raise RunError(f"--init_from={path} holds neither a BalPoE network's weights nor keras-hub's ResNet-50's "
                       f"({problem.splitlines()[0][:200]}): pass a run folder, a .keras file or a keras-hub preset")
    return backbone


def _is_preset_name(path: str) -> bool:
    """Whether `--init_from=path`, naming nothing on disk, reads as a keras-hub preset: a handle
    (`kaggle://...`, `hf://...`) or a bare name such as `resnet_50_imagenet`."""
    return not os.path.exists(path) and ("://" in path or (os.sep not in path and not os.path.splitext(path)[1]))


def _from_weights_file(path: str, like: BalPoENetwork):
    """The BalPoE network whose `save_weights` wrote `path`, with the backbone of `like` (its
    experts and classes read from the file), or the plain backbone whose file it is."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            names = []
            f.visititems(lambda name, item: names.append((name, item.shape)) if hasattr(item, "shape") else None)
    except OSError as e:
        raise RunError(f"--init_from={path} is not a readable weights file ({e})") from None
    experts = {name.split("/")[1] for name, _ in names if name.startswith("experts/")}
    classifiers = [shape for name, shape in names if name.startswith("experts/") and "/classifier/" in name]
    if not experts or not classifiers:
        return _plain_weights_file(path, like)
    network = BalPoENetwork(classifiers[0][-1], len(experts), like.backbone, like.scale, like.image_shape)
    try:
        network.load_weights(path)
    except Exception as e:  # Keras names a mismatch in several error types
        raise RunError(f"--init_from={path} does not hold the weights of a {like.backbone} BalPoE network "
                       f"({error_line(e)}): pass weights saved from a network with this run's --backbone") from None
    return network


def _names_keras_hub(path: str) -> bool:
    """Whether the `.keras` file `path` holds a keras-hub model (its configuration names keras_hub)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return b"keras_hub" in archive.read("config.json")
    except (OSError, KeyError, zipfile.BadZipFile):
        return False  # load_model_file names what is wrong with the file


def load_source(path: str, like: BalPoENetwork) -> Tuple[str, keras.Model]:
    """(file or preset, network) that `--init_from=path` names: a BalPoE network checked to have
    the backbone of `like`, or a plain backbone (module docstring)."""
    by_name = _is_preset_name(path)
    if by_name or os.path.isfile(os.path.join(path, "metadata.json")):
        _check_takes_plain(path, like)
        flag = f"--init_from={path}" + (" (no such file or folder: read as a preset)" if by_name else "")
        return path, from_preset(path, flag, "float32")
    source = _source_file(path)
    if source.endswith(".weights.h5"):
        network = _from_weights_file(source, like)
    else:
        if _names_keras_hub(source):
            keras_hub(f"--init_from={path} (a keras-hub model)")  # registers the classes the file names
        network = load_model_file(source)
    if not isinstance(network, BalPoENetwork):
        if not isinstance(network, keras.Model):
            raise RunError(f"--init_from={path}: {source} holds a {type(network).__name__}, not a network")
        _check_takes_plain(path, like)
        return source, network
    if network.backbone != like.backbone:
        raise RunError(f"--init_from={path} is a {network.backbone} network and this run's --backbone is "
                       f"{like.backbone}: pass --backbone={network.backbone}, or a source of {like.backbone}")
    return source, network


def _body(part):
    """A trunk's or expert's weights without its classifier's."""
    classifier = getattr(part, "classifier", None)
    skip = {id(w) for w in classifier.weights} if classifier is not None else set()
    return [w for w in part.weights if id(w) not in skip]


def copy_weights(source: BalPoENetwork, target: BalPoENetwork, source_name: str) -> InitReport:
    """Copy the trunk and each expert's stages of `source` into `target` where shapes match
    (expert m from expert m mod M'), and report what was copied."""
    pairs = [(_body(source.trunk), _body(target.trunk))]
    pairs += [(_body(source.experts[m % len(source.experts)]), _body(expert))
              for m, expert in enumerate(target.experts)]
    loaded, why = [], {}
    for from_weights, to_weights in pairs:
        for i, weight in enumerate(to_weights):
            if i >= len(from_weights):
                why[id(weight)] = "missing in the source"
            elif tuple(from_weights[i].shape) != tuple(weight.shape):
                why[id(weight)] = f"shape {tuple(from_weights[i].shape)} in the source, {tuple(weight.shape)} here"
            else:
                weight.assign(from_weights[i].numpy())
                loaded.append(weight)
    return _report(target, source_name, loaded, why)


def copy_named_weights(source: keras.Model, target: BalPoENetwork, source_name: str) -> InitReport:
    """Copy each layer of the plain backbone `source` into the layer of `target` of the same
    keras-hub name (`keras_hub_names`): the trunk once, the last stages into every expert."""
    found = {layer.name: layer for layer in source._flatten_layers()}
    named = target.trunk.keras_hub_names() + [pair for e in target.experts for pair in e.keras_hub_names()]
    loaded, why = [], {}
    for name, layer in named:
        theirs = found.get(name)
        if theirs is None or len(theirs.weights) != len(layer.weights):
            reason = (f"no layer {name} in the source" if theirs is None else
                      f"{len(theirs.weights)} tensors in the source's {name}, {len(layer.weights)} here")
            why.update((id(w), reason) for w in layer.weights)
            continue
        for mine, their in zip(layer.weights, theirs.weights):
            if tuple(mine.shape) != tuple(their.shape):
                why[id(mine)] = f"shape {tuple(their.shape)} in the source's {name}, {tuple(mine.shape)} here"
            else:
                mine.assign(keras.ops.convert_to_numpy(their))
                loaded.append(mine)
    return _report(target, source_name, loaded, why)


def _report(model: BalPoENetwork, source: str, loaded: list, why=None) -> InitReport:
    """The report of `loaded`, the weights of `model` that came from `source`; `why` gives the
    reason (by `id`) of a weight left at its initial value, "a new layer" by default."""
    copied, why = {id(w) for w in loaded}, why or {}
    body = [w for part in (model.trunk, *model.experts) for w in _body(part)]
    trainable = {id(v): i for i, v in enumerate(model.trainable_variables)}
    # Named without the model's name, which Keras numbers per process.
    left = [(w.path.split("/", 1)[-1], why.get(id(w), "a new layer")) for w in body if id(w) not in copied]
    return InitReport(source, len(body) - len(left), sum(int(np.prod(w.shape)) for w in loaded), len(body),
                      sum(int(np.prod(w.shape)) for w in body), left,
                      sorted(trainable[id(w)] for w in loaded if id(w) in trainable))


def preset_report(model: BalPoENetwork) -> InitReport:
    """What a network on a keras-hub backbone (`models.hub`) took from its preset: the trunk and
    each expert's copy of the last stages; an expert's dense head is new."""
    loaded = list(model.trunk.weights) + [w for e in model.experts if e.body is not None for w in e.body.weights]
    return _report(model, model.backbone, loaded)


def initialise(model: BalPoENetwork, path: str) -> InitReport:
    """Start `model` from `--init_from=path` (see the module's docstring).

    Raises:
        RunError: `path` is not a usable source, or fills less than `MIN_LOADED_SHARE` of the
            model's parameters outside the classifiers (naming the first mismatches).
    """
    source_name, source = load_source(path, model)
    plain = not isinstance(source, BalPoENetwork)
    report = (copy_named_weights if plain else copy_weights)(source, model, source_name)
    if report.loaded_params < MIN_LOADED_SHARE * report.total_params:
        raise RunError(f"--init_from={path} fills only {report.loaded_params:,} of {report.total_params:,} "
                       "parameters outside the classifiers; first mismatches: "
                       + "; ".join(f"{name}: {why}" for name, why in report.left[:NAMED])
                       + (". Pass keras-hub's bottleneck ResNet-50 (e.g. the preset resnet_50_imagenet) with this "
                          "run's image channels" if plain else
                          ". Pass a source with this run's --backbone and image channels"))
    return report
