import base64
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from balpoe_tf import data as lt_data, run_data
from balpoe_tf.config import RunError
from conftest import skip_without_kernels
from balpoe_tf import (evaluation, experiment, export, models, precision, run_config, run_folder, settings,
                       task)
from image_corpus import corpus


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained digits run; training ends with the automatic export."""
    out = tmp_path_factory.mktemp("run")
    config = run_config.RunConfig(output_dir=str(out), dataset="digits", imbalance_ratio=10,
                                  augment="none", backbone="resnet8", epochs=1, batch_size=64,
                                  warmup_epochs=0, milestones=[], eval_every=1, checkpoint_every=1,
                                  precision="float32")  # as the SavedModel: they must agree to 1e-4
    experiment.train(config, log=lambda line: None)
    model, record = run_folder.load_run(str(out))
    data = run_data.load_data(config)
    return out, model, record, data


def _png(image):
    return tf.io.encode_png(image).numpy()


@pytest.mark.slow
def test_layout_and_versions(run, tmp_path):
    out, model, record, _ = run
    assert (out / "export" / "1" / "saved_model.pb").exists()
    assert (out / "export" / "1" / "variables").is_dir()
    assert (out / "model.keras").exists()  # the native Keras file stays
    assert export.next_version(str(out / "export")) == 2
    first = export.export_run(model, record, str(tmp_path))
    second = export.export_run(model, record, str(tmp_path))
    assert (os.path.basename(first), os.path.basename(second)) == ("1", "2")
    with open(os.path.join(first, "assets.extra", export.METADATA_NAME)) as f:
        assert json.load(f)["signatures"] == list(export.SIGNATURES)  # what it holds, named for the log
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # each written whole, then renamed into place


@pytest.mark.slow
def test_signatures_match_the_keras_model(run):
    out, model, record, data = run
    loaded = tf.saved_model.load(str(out / "export" / "1"))
    assert set(export.SIGNATURES) <= set(loaded.signatures)
    pixels = data.test.images[:4]
    images = lt_data.normalizer(data.mean, data.std)(pixels)
    expected = model(images, training=False)
    by_tensor = loaded.signatures["predict_tensor"](images=images)
    by_bytes = loaded.signatures["serving_default"](images=tf.constant([_png(p) for p in pixels]))
    for out_ in (by_tensor, by_bytes):
        np.testing.assert_allclose(out_["logits"], expected["logits"], atol=1e-4)
        np.testing.assert_allclose(out_["expert_logits"], expected["expert_logits"], atol=1e-4)
        np.testing.assert_allclose(out_["probabilities"], tf.nn.softmax(expected["logits"]), atol=1e-5)
        top = np.argsort(-expected["logits"].numpy(), axis=1)[:, :5]
        np.testing.assert_array_equal(out_["top_k_classes"], top)
        assert [n.decode() for n in out_["top_k_names"].numpy()[0]] == [data.class_names[c] for c in top[0]]


@pytest.mark.slow
def test_prior_signatures_apply_the_posthoc_adjustment(run):
    out, model, record, data = run
    loaded = tf.saved_model.load(str(out / "export" / "1"))
    pixels = data.test.images[:3]
    images = tf.constant([_png(p) for p in pixels])
    prior = np.linspace(1.0, 0.0, 10).astype(np.float32)  # the last class absent
    plain = loaded.signatures["serving_default"](images=images)["logits"].numpy()
    expected = evaluation.posthoc_adjust(plain, prior, record.data.train_counts, 0.0)
    got = loaded.signatures["predict_with_prior"](images=images, prior=tf.constant(prior))["logits"]
    # Equal up to a constant per row (softmax is shift-invariant): compare centred logits.
    centre = lambda z: z - z.mean(axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(centre(got.numpy()), centre(expected), atol=1e-3)
    by_log = loaded.signatures["predict_with_log_prior"](
        images=images, log_prior=tf.constant(np.log(np.maximum(prior / prior.sum(), 1e-8)), tf.float32))
    np.testing.assert_allclose(centre(by_log["logits"].numpy()), centre(expected), atol=1e-3)


@pytest.mark.slow
def test_bad_inputs_give_clear_errors_and_the_model_keeps_serving(run):
    out, _, _, data = run
    loaded = tf.saved_model.load(str(out / "export" / "1"))
    good = tf.constant([_png(data.test.images[0])])
    cases = [
        ("serving_default", dict(images=tf.constant([b"not an image"])),
         "image 0 of the batch is not a JPEG, PNG, GIF, BMP or WebP image"),
        ("predict_tensor", dict(images=tf.zeros([1, 9, 8, 1])), "images must be a \\[batch, 8, 8, 1\\] tensor"),
        ("predict_with_prior", dict(images=good, prior=tf.ones([3])), "prior must have 10 entries"),
        ("predict_with_prior", dict(images=good, prior=tf.constant([-1.0] + [1.0] * 9)), "no negative entries"),
    ]
    for name, inputs, message in cases:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            loaded.signatures[name](**inputs)
    assert loaded.signatures["serving_default"](images=good)["probabilities"].shape == (1, 10)


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    path, request_file = sys.argv[1], sys.argv[2]
    loaded = tf.saved_model.load(path)
    # What TF Serving's REST API does with a request body: "instances" (row format) or
    # "inputs" (columnar), {"b64": ...} turned into bytes.
    def tensor(value):
        if isinstance(value, dict) and "b64" in value:
            import base64
            return base64.b64decode(value["b64"])
        if isinstance(value, list):
            return [tensor(v) for v in value]
        return value
    out = {}
    for request in json.load(open(request_file)):
        fn = loaded.signatures[request.get("signature_name", "serving_default")]
        if "instances" in request:
            inputs = {"images": tf.constant(tensor(request["instances"]))}
        else:
            inputs = {k: tf.constant(tensor(v)) for k, v in request["inputs"].items()}
        result = fn(**inputs)
        out[request.get("signature_name", "serving_default")] = {
            k: v.numpy().tolist() for k, v in result.items() if v.dtype != tf.string}
    assert not any(m.startswith("balpoe_tf") for m in sys.modules)
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_rest_requests_in_a_process_without_balpoe_tf(run, tmp_path):
    out, model, _, data = run
    pixels = data.test.images[:2]
    b64 = [{"b64": base64.b64encode(_png(p)).decode()} for p in pixels]
    requests = [{"instances": b64},
                {"signature_name": "predict_with_prior", "inputs": {"images": b64, "prior": [0.1] * 10}}]
    request_file = tmp_path / "requests.json"
    request_file.write_text(json.dumps(requests))
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(out / "export" / "1"), str(request_file)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    expected = model(lt_data.normalizer(data.mean, data.std)(pixels), training=False)["logits"].numpy()
    np.testing.assert_allclose(served["serving_default"]["logits"], expected, atol=1e-4)
    assert np.array(served["predict_with_prior"]["probabilities"]).shape == (2, 10)


@pytest.mark.slow
def test_saved_model_cli_lists_the_signatures(run):
    out = run[0]
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    command = [cli] if os.path.exists(cli) else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    result = subprocess.run(command + ["show", "--dir", str(out / "export" / "1"), "--all"],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-2000:]
    for name in export.SIGNATURES:
        assert f"signature_def['{name}']" in result.stdout
    assert "dtype: DT_STRING" in result.stdout and "top_k_names" in result.stdout


def test_export_tool_errors(tmp_path):
    with pytest.raises(RunError, match="holds no trained model"):
        export.export_from_config(settings.ExportConfig(run_dir=str(tmp_path)))


def _untrained_run(run_dir, precision):
    """A run folder as tools/train.py leaves one (model.keras and config.json), untrained."""
    with models.precision_policy(precision):
        model = task.BalPoEModel(10, num_experts=2, backbone="resnet8", input_shape=(8, 8, 3))
    model.save(run_dir / "model.keras")
    record = run_folder.RunRecord(
        config={"precision": precision, "lambdas": [1.0, -1.0], "backbone": "resnet8", "num_experts": 2},
        data=run_folder.DataRecord(name="untrained", num_classes=10, train_size=100, test_size=10,
                                   train_counts=[10] * 10, class_names=[str(c) for c in range(10)],
                                   mean=list(lt_data.CIFAR_MEAN), std=list(lt_data.CIFAR_STD), image_shape=[8, 8, 3]))
    (run_dir / "config.json").write_text(json.dumps(record.to_dict()))
    return model


@pytest.mark.slow
def test_a_bfloat16_run_ends_with_a_float32_saved_model(tmp_path):
    skip_without_kernels("mixed_bfloat16")
    config = run_config.RunConfig(output_dir=str(tmp_path), dataset="digits", imbalance_ratio=10, augment="none",
                                  backbone="resnet8", epochs=1, batch_size=64, warmup_epochs=0, milestones=[],
                                  precision="mixed_bfloat16")
    experiment.train(config, log=lambda line: None)
    trained, record = run_folder.load_run(str(tmp_path))
    assert trained.dtype_policy.name == record.settings.precision == "mixed_bfloat16"
    as_float32, _ = run_folder.load_run(str(tmp_path), "float32")
    served = tf.saved_model.load(str(tmp_path / "export" / "1")).signatures["predict_tensor"]
    with open(tmp_path / "export" / "1" / "assets.extra" / export.METADATA_NAME) as f:
        assert json.load(f)["precision"] == "float32"
    images = np.random.RandomState(0).uniform(-1, 1, (4, *trained.image_shape)).astype(np.float32)
    np.testing.assert_allclose(served(images=images)["logits"], as_float32(images, training=False)["logits"],
                               atol=1e-4)


@pytest.mark.slow
def test_a_run_loads_in_its_precision_and_exports_in_float32_unless_told(tmp_path):
    skip_without_kernels("mixed_bfloat16")
    saved = _untrained_run(tmp_path, "mixed_bfloat16")
    images = np.random.RandomState(0).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    model, _ = run_folder.load_run(str(tmp_path))
    assert model.dtype_policy.name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after loading
    np.testing.assert_array_equal(model(images, training=False)["logits"], saved(images, training=False)["logits"])
    as_float32, _ = run_folder.load_run(str(tmp_path), "float32")
    assert as_float32.dtype_policy.name == "float32"
    bf16_logits, float32_logits = (m(images, training=False)["logits"].numpy() for m in (model, as_float32))
    assert np.abs(bf16_logits - float32_logits).max() > 1e-2  # bfloat16 rounding shows at this scale

    for flags, compute in (({"precision": "mixed_bfloat16"}, "bfloat16"), ({}, "float32")):
        path = export.export_from_config(settings.ExportConfig(run_dir=str(tmp_path), **flags),
                                         log=lambda line: None)
        with open(os.path.join(path, "assets.extra", export.METADATA_NAME)) as f:
            assert json.load(f)["precision"] == flags.get("precision", "float32")
        serve = tf.saved_model.load(path).signatures["predict_tensor"]
        library = serve.graph.as_graph_def().library.function
        assert {tf.as_dtype(node.attr["T"].type).name for function in library for node in function.node_def
                if node.op == "Conv2D"} == {compute}
    np.testing.assert_allclose(serve(images=images)["logits"], float32_logits, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("speedup, chosen", [(1.8, "mixed_bfloat16"), (0.6, "float32")])
def test_export_auto_serves_in_the_precision_measured_faster_here(tmp_path, monkeypatch, speedup, chosen):
    skip_without_kernels("mixed_bfloat16")
    _untrained_run(tmp_path, "float32")
    monkeypatch.setenv("BALPOE_TF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(precision, "gpu_capabilities", lambda: [])
    measured = []

    def measure(make_step, candidates, images_per_step, total_steps):
        # The real steps are made: each predicts a batch with the run loaded in its precision.
        measured.append([make_step(p)() for p in ("float32", *candidates)])
        return {"rates": {"float32": 100.0, "mixed_bfloat16": 100.0 * speedup},
                "speedups": {"mixed_bfloat16": speedup}, "float32_step": 0.1, "measuring_cost": 1.0}

    monkeypatch.setattr(precision, "measure_speeds", measure)
    lines = []
    path = export.export_from_config(settings.ExportConfig(run_dir=str(tmp_path), precision="auto"), log=lines.append)
    assert len(measured) == 1 and [logits.shape for logits in measured[0]] == [(export.SERVING_BATCH, 10)] * 2
    assert lines[0].startswith(f"precision {chosen} (--precision=auto, measured now on this machine and model: "
                               "prediction images/s")
    with open(os.path.join(path, "assets.extra", export.METADATA_NAME)) as f:
        assert json.load(f)["precision"] == chosen
    with pytest.raises(RunError, match="holds no config.json"):
        export.export_from_config(settings.ExportConfig(run_dir=str(tmp_path / "none"), precision="auto"))


@pytest.fixture(scope="module")
def rgb_export(tmp_path_factory):
    """An untrained 3-channel model (8 x 8 inputs) exported as a SavedModel."""
    model = task.BalPoEModel(10, num_experts=1, backbone="resnet8", input_shape=(8, 8, 3))
    path = export.export_saved_model(model, str(tmp_path_factory.mktemp("rgb")), lt_data.CIFAR_MEAN,
                                     lt_data.CIFAR_STD, [str(c) for c in range(10)], [10] * 10, 0.0)
    return tf.saved_model.load(path).signatures["serving_default"]


@pytest.mark.slow
def test_unusual_image_bytes_are_served_or_refused_by_name(rgb_export):
    serve = lambda *images: rgb_export(images=tf.constant(list(images)))["logits"].numpy()  # noqa: E731
    rgb = np.random.RandomState(0).randint(0, 256, (16, 12, 3)).astype(np.uint8)
    gray = rgb[..., :1]
    expected = serve(_png(rgb))
    # Grayscale is replicated to RGB, alpha is dropped, 16 bits are scaled to 8.
    np.testing.assert_allclose(serve(_png(gray)), serve(_png(np.repeat(gray, 3, axis=-1))), atol=1e-5)
    np.testing.assert_allclose(serve(_png(np.concatenate([rgb, np.full_like(gray, 77)], -1))), expected, atol=1e-5)
    np.testing.assert_allclose(serve(_png(tf.constant(rgb.astype(np.uint16) * 257))), expected, atol=1e-5)
    large = np.random.RandomState(1).randint(0, 256, (1500, 2000, 3)).astype(np.uint8)
    np.testing.assert_allclose(serve(_png(large)), serve(_png(tf.image.resize(large, (8, 8), antialias=True)
                                                             .numpy().round().astype(np.uint8))), atol=1e-4)

    jpeg = tf.io.encode_jpeg(rgb).numpy()
    huge = _png(tf.zeros([8000, 8000, 1], tf.uint8))  # 64 megapixels in 80 KB: refused from its header
    for contents, message in [(b"", "image 1 of the batch is empty"),
                              (jpeg[:len(jpeg) // 2], "image 1 of the batch is truncated"),
                              (huge, "image 1 of the batch has more than 40,000,000 pixels")]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            serve(_png(rgb), contents)
    np.testing.assert_allclose(serve(_png(rgb)), expected)  # still serving


@pytest.mark.slow
def test_the_image_corpus_is_served_or_refused_by_its_place_in_the_batch(rgb_export):
    serve = lambda *images: rgb_export(images=tf.constant(list(images)))["logits"].numpy()  # noqa: E731
    good = _png(np.zeros((8, 8, 3), np.uint8))
    # Pillow reads them, TensorFlow does not (or misreads them): tools/predict.py converts them first.
    refused_here = {"scan.tif": "is not a JPEG, PNG, GIF, BMP or WebP image",
                    "palette.bmp": "is a BMP of 8 bits or fewer per pixel: send it as PNG"}
    for name, (contents, kind) in corpus().items():
        if kind.pixels is not None and name not in refused_here:
            np.testing.assert_allclose(serve(good, contents), serve(good, _png(kind.pixels)), atol=1e-5,
                                       err_msg=name)
            continue
        problem = refused_here.get(name) or {"cannot be decoded": "is truncated", "empty file": "is empty",
                                             "not an image": "is not a JPEG"}.get(kind.problem, "has more than")
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"image 1 of the batch {problem}"):
            serve(good, contents)
