"""benchmarks/official/check_equivalence.py: an official ResNet-32 state dict (PyTorch names and
layouts, generated here) lands in the right `BalPoEModel` weights."""

import importlib.util
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("check_equivalence",
                                              os.path.join(REPO, "benchmarks", "official", "check_equivalence.py"))
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


def official_state(num_experts=3, num_classes=10, seed=0):
    """Random tensors under the official `ResNet32Model`'s state-dict names, in its order (every
    expert's stage 2, then every expert's stage 3, then the classifiers), PyTorch layouts."""
    rng = np.random.RandomState(seed)
    state = {}

    def conv_bn(prefix, conv, bn, cin, cout):
        state[f"{prefix}{conv}.weight"] = rng.randn(cout, cin, 3, 3).astype(np.float32)
        for name in ("weight", "bias", "running_mean", "running_var"):
            state[f"{prefix}{bn}.{name}"] = rng.rand(cout).astype(np.float32)

    def stage(prefix, cin, cout):
        for i in range(5):
            conv_bn(f"{prefix}{i}.", "conv1", "bn1", cin if i == 0 else cout, cout)
            conv_bn(f"{prefix}{i}.", "conv2", "bn2", cout, cout)

    conv_bn("backbone.", "conv1", "bn1", 3, 16)
    stage("backbone.layer1.", 16, 16)
    for e in range(num_experts):
        stage(f"backbone.layer2s.{e}.", 16, 32)
    for e in range(num_experts):
        stage(f"backbone.layer3s.{e}.", 32, 64)
    for e in range(num_experts):
        state[f"backbone.linears.{e}.weight"] = rng.randn(64, num_classes).astype(np.float32)
    return state


def test_official_weights_land_where_they_belong(tmp_path):
    state = official_state()
    np.savez(tmp_path / "step.npz", **{"before/" + k: v for k, v in state.items()})
    model, _ = check.load_official(np.load(tmp_path / "step.npz"), num_classes=10)
    weights = {w.path: w.numpy() for w in model.weights}

    def under(prefix, suffix, index=0):
        # the model's own name varies with the models built before it in this process
        return [v for p, v in weights.items() if p.startswith(f"{model.name}/{prefix}") and p.endswith(suffix)][index]

    np.testing.assert_array_equal(under("expert1/classifier", "kernel"), state["backbone.linears.1.weight"])
    np.testing.assert_array_equal(under("expert2/stage2/block0/", "kernel"),
                                  state["backbone.layer2s.2.0.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(under("expert0/stage3/block4/", "kernel", 1),
                                  state["backbone.layer3s.0.4.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(under("trunk/stage1/block3/", "moving_variance", 1),
                                  state["backbone.layer1.3.bn2.running_var"])
    np.testing.assert_array_equal(under("trunk/", "gamma"), state["backbone.bn1.weight"])
