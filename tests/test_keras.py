"""Keras files: read with h5py alone, converted by fc2conv, proven against Keras's own outputs.

Every model is built and run by Keras (on its PyTorch backend); fc2conv reads the saved file with no
shape or order given. Two independent proofs: a PyTorch network rebuilt here from the converted
tensors (NCHW, float64, torch.nn.functional) gives Keras's outputs; and the Keras export gives the
original scores at the traced size and, on larger inputs, the original model on every window.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("KERAS_BACKEND", "torch")
h5py = pytest.importorskip("h5py")
keras = pytest.importorskip("keras")

from fc2conv.convert import apply_plan, fc_to_conv_weight  # noqa: E402
from fc2conv.errors import CheckpointError, DependencyError, PlanError, ShapeError  # noqa: E402
from fc2conv.formats import read_listing  # noqa: E402
from fc2conv.formats.keras import KerasFile, KerasHead, read_keras  # noqa: E402
from fc2conv.jobs.planning import plan_for  # noqa: E402
from fc2conv.keras_export import export_keras  # noqa: E402
from fc2conv.plan import LayerChange, Plan, plan_conversion  # noqa: E402
from fc2conv.types import FlattenOrder, InputShape  # noqa: E402

L = keras.layers
# Keras's torch backend converts tensors with np.array(x, copy=False) semantics numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
# float32 Keras against a float64 rebuild: a few float32 roundings, relative to the output's scale.
RTOL = 1e-5


def setup_module() -> None:
    keras.utils.set_random_seed(0)


# --- planning, as convert plans a Keras file ------------------------------------------------------


def plan_keras(kf: KerasFile, input_shape: str | None = None, flatten_order: FlattenOrder | None = None) -> Plan:
    """The plan ``fc2conv convert`` makes of the file (its listing, with the heads its config describes)."""
    return plan_for(read_listing(kf.path), input_shape, flatten_order, None, False, "auto", False)


def head_changes(head: KerasHead, kf: KerasFile) -> tuple[LayerChange, ...]:
    """The layer changes of one head alone."""
    return plan_conversion(kf.infos, heads=[head.hint]).layers


# --- models ------------------------------------------------------------------------------------


def tutorial(units: int = 1024, channels: int = 256) -> keras.Model:
    """The tutorial's head: a 4x4x256 map -> Flatten -> Dense(1024) -> Dense(10)."""
    return keras.Sequential(
        [
            keras.Input((4, 4, channels)),
            L.Flatten(name="flatten"),
            L.Dense(units, activation="relu", name="fc1"),
            L.Dense(10, name="fc2"),
        ],
        name="tutorial",
    )


def trunk_model() -> keras.Model:
    """Conv trunk with pooling and Dropout, two Dense. Names swapped against positions on purpose:
    the first Dense is called "dense_1" and the second "dense", so a reader that maps the .keras
    paths layers/dense, layers/dense_1 by name instead of by position gets them backwards."""
    return keras.Sequential(
        [
            keras.Input((10, 10, 3)),
            L.Conv2D(6, 3, activation="relu", name="conv"),
            L.MaxPooling2D(2, name="pool"),
            L.Dropout(0.3, name="drop_map"),
            L.Flatten(name="flat"),
            L.Dense(12, activation="relu", name="dense_1"),
            L.Dropout(0.5, name="drop_fc"),
            L.Dense(5, activation="softmax", name="dense"),
        ],
        name="trunk",
    )


def channels_first_model(flatten_format: str) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((3, 10, 10)),
            L.Conv2D(6, 3, data_format="channels_first", activation="relu", name="conv"),
            L.MaxPooling2D(2, data_format="channels_first", name="pool"),
            L.Flatten(data_format=flatten_format, name="flat"),
            L.Dense(12, activation="relu", name="fc1"),
            L.Dense(5, name="fc2"),
        ],
        name=f"cf_{flatten_format}",
    )


def functional_model() -> keras.Model:
    """Functional: BatchNorm without scale in the trunk, BatchNorm and Softmax layers in the head."""
    x = keras.Input((6, 6, 2), name="image")
    y = L.Conv2D(4, 3, name="conv")(x)
    y = L.BatchNormalization(scale=False, name="bn_map")(y)
    y = L.ReLU(name="relu")(y)
    y = L.Flatten(name="flat")(y)
    y = L.Dense(8, name="fc1")(y)
    y = L.BatchNormalization(center=False, name="bn_fc")(y)
    y = L.Activation("tanh", name="act")(y)
    y = L.Dense(3, name="fc2")(y)
    y = L.Softmax(name="probs")(y)
    return keras.Model(x, y, name="functional")


def randomize_batchnorm(model: keras.Model) -> None:
    """Give BatchNorm layers non-trivial statistics, as a trained model has."""
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            values = []
            for variable in layer.weights:
                positive = "variance" in variable.path or "gamma" in variable.path
                draw = rng.uniform(0.5, 2.0, variable.shape) if positive else rng.normal(0, 0.5, variable.shape)
                values.append(draw.astype("float32"))
            layer.set_weights(values)


# --- files -------------------------------------------------------------------------------------


def save(model: keras.Model, folder: Path, kind: str) -> Path:
    """``kind``: "keras" (Keras 3 zip), "h5" (Keras 3 legacy HDF5) or "tf2" (tf.keras 2 layout, built here)."""
    if kind == "tf2":
        return save_tf2_style(model, folder / f"{model.name}.tf2.h5")
    path = folder / f"{model.name}.{kind}"
    model.save(path)
    return path


def _tf2_config(layer: keras.layers.Layer) -> dict:
    """A layer's config as tf.keras 2 wrote it: dtype a plain string, no module or build_config."""
    config = layer.get_config()
    config["dtype"] = "float32"
    return {"class_name": type(layer).__name__, "config": config}


def save_tf2_style(model: keras.Model, path: Path) -> Path:
    """A full-model .h5 in tf.keras 2's documented layout (tensorflow/python/keras/saving/hdf5_format.py).

    Root attributes ``keras_version`` "2.x", ``backend`` "tensorflow" and ``model_config`` (JSON with
    ``batch_input_shape``, inbound nodes as ``[[[layer, 0, 0, {}]]]``); group ``model_weights`` with
    ``layer_names``, and per layer a group with ``weight_names`` such as ``fc1/kernel:0``, the datasets
    at ``model_weights/fc1/fc1/kernel:0``, trainable weights first. tf.keras 2 itself cannot run here.
    """
    sequential = isinstance(model, keras.Sequential)
    batch_input_shape = [None, *model.inputs[0].shape[1:]]
    input_name = "input_1"
    entries = [
        {
            "class_name": "InputLayer",
            "config": {
                "batch_input_shape": batch_input_shape,
                "dtype": "float32",
                "sparse": False,
                "ragged": False,
                "name": input_name,
            },
        }
    ]
    previous = input_name
    for layer in model.layers:
        if isinstance(layer, L.InputLayer):
            continue
        entry = _tf2_config(layer)
        if not sequential:
            entry["name"] = layer.name
            entry["inbound_nodes"] = [[[previous, 0, 0, {}]]]
        entries.append(entry)
        previous = layer.name
    if sequential:
        config = {"class_name": "Sequential", "config": {"name": model.name, "layers": entries}}
    else:
        entries[0]["name"] = input_name
        entries[0]["inbound_nodes"] = []
        config = {
            "class_name": "Functional",
            "config": {
                "name": model.name,
                "layers": entries,
                "input_layers": [[input_name, 0, 0]],
                "output_layers": [[previous, 0, 0]],
            },
        }
    weighted = [layer for layer in model.layers if not isinstance(layer, L.InputLayer)]
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.15.0"
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps(config).encode("utf8")
        group = f.create_group("model_weights")
        names = ([] if sequential else [input_name]) + [layer.name for layer in weighted]
        group.attrs["layer_names"] = [n.encode("utf8") for n in names]
        group.attrs["backend"] = b"tensorflow"
        group.attrs["keras_version"] = b"2.15.0"
        for name in sorted(names):
            layer_group = group.create_group(name)
            layer = next((lyr for lyr in weighted if lyr.name == name), None)
            variables = (layer.trainable_weights + layer.non_trainable_weights) if layer is not None else []
            weight_names = [f"{name}/{v.name}:0".encode() for v in variables]
            layer_group.attrs["weight_names"] = weight_names
            for weight_name, variable in zip(weight_names, variables, strict=True):
                layer_group.create_dataset(weight_name.decode(), data=keras.ops.convert_to_numpy(variable))
    return path


def keras_outputs(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(x, verbose=0), dtype=np.float64)


# --- the independent PyTorch rebuild -------------------------------------------------------------


def converted_tensors(kf: KerasFile) -> dict[str, torch.Tensor]:
    """Every tensor, each head's Dense weights turned into conv kernels by fc2conv's own rule."""
    tensors = {name: kf.tensors[name] for name in kf.tensors}
    for head in kf.heads:
        for change in head_changes(head, kf):
            tensors[change.weight] = fc_to_conv_weight(tensors[change.weight], change)
    return tensors


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    return {
        "linear": lambda t: t,
        "relu": F.relu,
        "tanh": torch.tanh,
        "softmax": lambda t: torch.softmax(t, dim=1),
    }[name](x)


def torch_forward(model: keras.Model, kf: KerasFile, tensors: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """The model in PyTorch, NCHW, float64, from fc2conv's tensors; Keras objects give only hyperparameters."""
    t = torch.from_numpy(x).double()
    first_head = kf.heads[0]
    if first_head.map_format == "channels_last":
        t = t.permute(0, 3, 1, 2)  # NHWC -> NCHW: the rebuild is a PyTorch network
    conv_head = {name for head in kf.heads for name in head.dense}

    def p(name: str) -> torch.Tensor | None:
        return tensors[name].double() if name in tensors else None

    for layer in model.layers:
        name = layer.name
        if isinstance(layer, L.Conv2D) and name not in conv_head:
            assert layer.padding == "valid"
            t = F.conv2d(t, p(f"{name}.weight"), p(f"{name}.bias"), stride=layer.strides)
            t = _activation(layer.get_config()["activation"], t)
        elif isinstance(layer, L.MaxPooling2D):
            t = F.max_pool2d(t, layer.pool_size, layer.strides)
        elif isinstance(layer, L.Dense):
            assert name in conv_head
            t = F.conv2d(t, p(f"{name}.weight"), p(f"{name}.bias"))  # the head, as convolutions
            t = _activation(layer.get_config()["activation"], t)
        elif isinstance(layer, L.BatchNormalization):
            t = F.batch_norm(
                t, p(f"{name}.running_mean"), p(f"{name}.running_var"), p(f"{name}.weight"), p(f"{name}.bias"),
                training=False, eps=layer.epsilon,
            )  # fmt: skip
        elif isinstance(layer, L.ReLU):
            t = F.relu(t)
        elif isinstance(layer, L.Activation):
            t = _activation(layer.get_config()["activation"], t)
        elif isinstance(layer, L.Softmax):
            t = torch.softmax(t, dim=1)
        elif isinstance(layer, L.Flatten | L.Dropout | L.InputLayer):
            pass  # Flatten: the conv head reads the map itself
        else:
            raise AssertionError(f"no rebuild for {type(layer).__name__}")
    assert t.shape[2:] == (1, 1)
    return t.flatten(1).numpy()


def assert_close(got: np.ndarray, want: np.ndarray) -> float:
    error = float(np.max(np.abs(got - want)))
    assert error <= RTOL * max(1.0, float(np.max(np.abs(want)))), error
    return error


# --- reading: heads, maps and orders from the config --------------------------------------------

FORMATS = ["keras", "h5", "tf2"]


@pytest.mark.parametrize("kind", FORMATS)
def test_trunk_model_read_converted_and_rebuilt_in_torch(tmp_path: Path, kind: str) -> None:
    model = trunk_model()
    path = save(model, tmp_path, kind)
    kf = read_keras(path)
    assert kf.flavour == {"keras": "keras", "h5": "h5 (Keras 3)", "tf2": "h5 (tf.keras 2)"}[kind]
    (head,) = kf.heads
    assert head.flatten == "flat" and head.dense == ("dense_1", "dense")
    assert head.layers == ("dense_1", "drop_fc", "dense") and head.between == ("drop_fc",)
    assert (head.feature_map, head.flatten_order, head.map_format) == (InputShape(6, 4, 4), "hwc", "channels_last")
    infos = {i.name: i.shape for i in kf.infos}
    assert infos == {
        "conv.weight": (6, 3, 3, 3), "conv.bias": (6,), "dense_1.weight": (12, 96), "dense_1.bias": (12,),
        "dense.weight": (5, 12), "dense.bias": (5,),
    }  # fmt: skip
    # The Dense kernels are the right ones (by value, not only by shape): transposed Keras kernels.
    assert torch.equal(kf.tensors["dense_1.weight"], torch.from_numpy(model.get_layer("dense_1").get_weights()[0].T))
    x = np.random.default_rng(0).standard_normal((6, 10, 10, 3)).astype("float32")
    assert_close(torch_forward(model, kf, converted_tensors(kf), x), keras_outputs(model, x))


@pytest.mark.parametrize("kind", FORMATS)
def test_small_tutorial_head_every_format(tmp_path: Path, kind: str) -> None:
    model = tutorial(units=32, channels=16)
    kf = read_keras(save(model, tmp_path, kind))
    (head,) = kf.heads
    assert (head.feature_map, head.flatten_order) == (InputShape(16, 4, 4), "hwc")
    x = np.random.default_rng(1).standard_normal((3, 4, 4, 16)).astype("float32")
    assert_close(torch_forward(model, kf, converted_tensors(kf), x), keras_outputs(model, x))


def test_wrong_flatten_order_is_caught(tmp_path: Path) -> None:
    """The same rebuild with the chw reshape (PyTorch's order) is far off: the order matters and is read right."""
    model = tutorial(units=32, channels=16)
    kf = read_keras(save(model, tmp_path, "keras"))
    tensors = converted_tensors(kf)
    change = head_changes(kf.heads[0], kf)[0]
    wrong = replace(change, flatten_order="chw")
    tensors[change.weight] = fc_to_conv_weight(kf.tensors[change.weight], wrong)
    x = np.random.default_rng(2).standard_normal((3, 4, 4, 16)).astype("float32")
    error = np.max(np.abs(torch_forward(model, kf, tensors, x) - keras_outputs(model, x)))
    assert error > 0.1


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize(("flatten_format", "order"), [("channels_last", "chw"), ("channels_first", "hwc")])
def test_channels_first_maps(tmp_path: Path, kind: str, flatten_format: str, order: str) -> None:
    """A plain Flatten of a channels-first map is chw; Flatten(data_format="channels_first") moves
    channels last first, so the same map flattens hwc."""
    model = channels_first_model(flatten_format)
    kf = read_keras(save(model, tmp_path, kind))
    (head,) = kf.heads
    assert (head.feature_map, head.map_format, head.flatten_order) == (InputShape(6, 4, 4), "channels_first", order)
    x = np.random.default_rng(3).standard_normal((4, 3, 10, 10)).astype("float32")
    assert_close(torch_forward(model, kf, converted_tensors(kf), x), keras_outputs(model, x))


def test_channels_first_flatten_of_a_channels_last_map_is_refused(tmp_path: Path) -> None:
    model = keras.Sequential(
        [keras.Input((6, 6, 2)), L.Conv2D(4, 3, name="conv"), L.Flatten(data_format="channels_first", name="flat"),
         L.Dense(3, name="fc")]
    )  # fmt: skip
    path = save(model, tmp_path, "keras")
    kf = read_keras(path)
    assert kf.heads == () and len(kf.refused) == 1
    with pytest.raises(PlanError, match=r"flatten layer flat has data_format channels_first .*\(W, C, H\)"):
        plan_keras(kf)


@pytest.mark.parametrize("kind", FORMATS)
def test_functional_batchnorm_without_scale_or_center(tmp_path: Path, kind: str) -> None:
    model = functional_model()
    randomize_batchnorm(model)
    kf = read_keras(save(model, tmp_path, kind))
    names = {i.name for i in kf.infos}
    assert {"bn_map.bias", "bn_map.running_mean", "bn_map.running_var"} <= names and "bn_map.weight" not in names
    assert {"bn_fc.weight", "bn_fc.running_mean", "bn_fc.running_var"} <= names and "bn_fc.bias" not in names
    assert any("bn_map (BatchNormalization): epsilon 0.001" in n and "scale=False" in n for n in kf.notes)
    (head,) = kf.heads
    assert head.layers == ("fc1", "bn_fc", "act", "fc2", "probs")
    assert (head.feature_map, head.flatten_order) == (InputShape(4, 4, 4), "hwc")
    x = np.random.default_rng(4).standard_normal((5, 6, 6, 2)).astype("float32")
    assert_close(torch_forward(model, kf, converted_tensors(kf), x), keras_outputs(model, x))


def test_tutorial_faithful_size_keras(tmp_path: Path) -> None:
    """Input 4x4x256 -> Flatten -> Dense(1024) -> Dense(10), at full size."""
    model = tutorial()
    kf = read_keras(save(model, tmp_path, "keras"))
    plan = plan_keras(kf)
    assert [(c.name, c.new_shape, c.flatten_order) for c in plan.layers] == [
        ("fc1", (1024, 256, 4, 4), "hwc"),
        ("fc2", (10, 1024, 1, 1), "chw"),
    ]
    x = np.random.default_rng(5).standard_normal((4, 4, 4, 256)).astype("float32")
    assert_close(torch_forward(model, kf, dict(apply_plan(plan, kf.tensors)), x), keras_outputs(model, x))


def test_nested_sequential_in_functional(tmp_path: Path) -> None:
    base = keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(4, 3, name="conv")], name="base")
    x = keras.Input((6, 6, 2))
    y = L.Dense(3, name="fc2")(L.Dense(5, name="fc1")(L.Flatten(name="flat")(base(x))))
    model = keras.Model(x, y, name="outer")
    for kind in ("keras", "h5"):
        kf = read_keras(save(model, tmp_path, kind))
        assert "base.conv.weight" in kf.tensors
        assert torch.equal(
            kf.tensors["base.conv.weight"],
            torch.from_numpy(base.get_layer("conv").get_weights()[0]).permute(3, 2, 0, 1),
        )
        (head,) = kf.heads
        assert (head.feature_map, head.map_format, head.flatten_order) == (InputShape(4, 4, 4), "channels_last", "hwc")


# --- plans: what the config says wins; a disagreement is an error -------------------------------


def test_plan_agrees_with_given_geometry_or_refuses(tmp_path: Path) -> None:
    kf = read_keras(save(trunk_model(), tmp_path, "keras"))
    assert plan_keras(kf, "6x4x4", "hwc").input_shape == InputShape(6, 4, 4)
    assert plan_keras(kf, "4x4").input_shape == InputShape(6, 4, 4)
    with pytest.raises(ShapeError, match=r"reads a 6x4x4 map \(C x H x W\) as the model says.*means 24x2x2"):
        plan_keras(kf, "24x2x2")
    with pytest.raises(PlanError, match=r"reads its map flattened hwc, as the model says.*given order is chw"):
        plan_keras(kf, flatten_order="chw")
    with pytest.raises(ShapeError, match=r"takes 96 inputs; 7x4x4 = 112"):
        plan_keras(kf, "7x4x4")


# --- errors: one clean fc2conv error, never a library traceback; code in the file never runs --------


def test_lambda_in_the_head_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "lambda_ran"

    def touch(t):  # noqa: ANN001, ANN202 - runs when Keras traces the model, never when fc2conv reads it
        marker.touch()
        return t * 2.0

    model = keras.Sequential(
        [keras.Input((4, 4, 3)), L.Flatten(name="flat"), L.Lambda(touch, name="lam"), L.Dense(5, name="fc")]
    )
    paths = [save(model, tmp_path, "keras"), save(model, tmp_path, "h5")]
    marker.unlink()
    for path in paths:
        kf = read_keras(path)  # the tensors are readable ...
        assert "fc.weight" in kf.tensors and kf.heads == ()
        with pytest.raises(PlanError, match=r"layer lam \(Lambda\), whose code fc2conv does not run"):
            plan_keras(kf)  # ... the head is not provable
        with pytest.raises(PlanError, match=r"lam \(Lambda\) is not a built-in Keras layer"):
            export_keras(kf, converted_tensors(kf), tmp_path / "out.keras")
        assert str(path) in str(pytest.raises(PlanError, plan_keras, kf).value)
    assert not marker.exists()


def _edit_h5_config(path: Path, edit) -> None:  # noqa: ANN001
    with h5py.File(path, "a") as f:
        config = json.loads(f.attrs["model_config"])
        edit(config["config"]["layers"])
        f.attrs["model_config"] = json.dumps(config).encode()


def test_custom_code_in_the_head_is_refused(tmp_path: Path) -> None:
    """A custom activation or a custom layer class in a head: data fc2conv never turns into code."""
    path = save(trunk_model(), tmp_path, "h5")

    def custom_activation(layers: list) -> None:  # noqa: ANN001
        layers[-3]["config"]["activation"] = {"module": "my_pkg", "class_name": "MyAct", "config": {}}

    _edit_h5_config(path, custom_activation)
    with pytest.raises(PlanError, match=r"layer dense_1 \(Dense\) has activation .*MyAct.*cannot prove"):
        plan_keras(read_keras(path))

    (tmp_path / "second").mkdir()
    path = save(trunk_model(), tmp_path / "second", "h5")

    def custom_layer(layers: list) -> None:  # noqa: ANN001
        layers[-2].update({"module": "my_pkg.layers", "class_name": "Dropout", "registered_name": "my_pkg>Dropout"})

    _edit_h5_config(path, custom_layer)
    kf = read_keras(path)
    assert kf.heads[0].dense == ("dense_1",)  # the chain ends before the custom layer after the first Dense
    assert not kf.layer("drop_fc").builtin


def _corruptions(tmp_path: Path) -> list[tuple[Path, str]]:
    keras_file = save(trunk_model(), tmp_path, "keras")
    h5_file = save(trunk_model(), tmp_path, "h5")
    cases = []

    def variant(source: Path, name: str) -> Path:
        target = tmp_path / name
        shutil.copy(source, target)
        return target

    half = variant(keras_file, "half.keras")
    half.write_bytes(keras_file.read_bytes()[: keras_file.stat().st_size // 2])
    cases.append((half, "corrupt or truncated"))
    half_h5 = variant(h5_file, "half.h5")
    half_h5.write_bytes(h5_file.read_bytes()[: h5_file.stat().st_size // 2])
    cases.append((half_h5, "corrupt or truncated"))
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a model at all" * 10)
    cases.append((garbage, "not a Keras model file"))
    bad_json = tmp_path / "bad_json.keras"
    with zipfile.ZipFile(keras_file) as src, zipfile.ZipFile(bad_json, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            dst.writestr(item, data[: len(data) // 2] if item == "config.json" else data)
    cases.append((bad_json, "config.json is not valid JSON"))
    no_weights = tmp_path / "no_weights.keras"
    with zipfile.ZipFile(keras_file) as src, zipfile.ZipFile(no_weights, "w") as dst:
        for item in src.namelist():
            if item != "model.weights.h5":
                dst.writestr(item, src.read(item))
    cases.append((no_weights, "no weights file"))
    broken_h5 = tmp_path / "broken_h5.keras"  # the zip is fine, the HDF5 inside is cut short
    with zipfile.ZipFile(keras_file) as src, zipfile.ZipFile(broken_h5, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            dst.writestr(item, data[:2000] if item == "model.weights.h5" else data)
    cases.append((broken_h5, "model.weights.h5 inside the archive is not a readable HDF5 file"))
    missing_layer = variant(h5_file, "missing_layer.h5")
    with h5py.File(missing_layer, "a") as f:
        del f["model_weights/dense_1"]
    cases.append((missing_layer, r"layer dense_1 \(Dense\): no model_weights/dense_1 group"))
    missing_var = tmp_path / "missing_var.keras"
    with zipfile.ZipFile(keras_file) as src:
        (tmp_path / "w.h5").write_bytes(src.read("model.weights.h5"))
        with h5py.File(tmp_path / "w.h5", "a") as f:
            del f["layers/dense/vars/1"]
        with zipfile.ZipFile(missing_var, "w") as dst:
            for item in src.namelist():
                dst.writestr(item, (tmp_path / "w.h5").read_bytes() if item == "model.weights.h5" else src.read(item))
    cases.append((missing_var, r"layer dense_1 \(Dense\): layers/dense/vars holds 1 variables"))
    weights_only = tmp_path / "weights_only.h5"
    trunk_model().save_weights(tmp_path / "w.weights.h5")
    shutil.copy(tmp_path / "w.weights.h5", weights_only)
    cases.append((weights_only, "no model_config|holds weights only"))
    return cases


def test_corrupt_and_truncated_files_give_one_clean_error(tmp_path: Path) -> None:
    for path, message in _corruptions(tmp_path):
        with pytest.raises(CheckpointError, match=message) as caught:
            read_keras(path)
        text = str(caught.value)
        assert str(path) in text and "\n" not in text and "Traceback" not in text, text
        assert "--" not in text  # never names a CLI flag


def test_a_tensor_that_cannot_be_read_names_its_layer(tmp_path: Path) -> None:
    path = save(trunk_model(), tmp_path, "h5")
    kf = read_keras(path)
    with h5py.File(path, "a") as f:  # the file changes after it was listed
        del f["model_weights/conv"]
    with pytest.raises(CheckpointError, match=r"layer conv: cannot read"):
        kf.tensors["conv.weight"]


def test_reading_never_imports_keras(tmp_path: Path) -> None:
    path = save(trunk_model(), tmp_path, "keras")
    code = (
        "import sys; from fc2conv.formats.keras import read_keras; kf = read_keras(sys.argv[1]); "
        "[kf.tensors[n] for n in kf.tensors]; assert 'keras' not in sys.modules, 'keras imported'"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=120)


def test_bfloat16_weights(tmp_path: Path) -> None:
    """Keras stores bfloat16 as 2-byte opaque data with a dtype attribute; read back bit for bit."""
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, dtype="bfloat16", name="fc")])
    kf = read_keras(save(model, tmp_path, "keras"))
    assert {i.name: i.dtype for i in kf.infos} == {"fc.weight": "bfloat16", "fc.bias": "bfloat16"}
    kernel = torch.tensor(keras.ops.convert_to_numpy(keras.ops.cast(model.get_layer("fc").kernel, "float32")))
    assert torch.equal(kf.tensors["fc.weight"].float(), kernel.t())


def test_reading_without_h5py_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(trunk_model(), tmp_path, "keras")
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    with pytest.raises(DependencyError, match="h5py") as caught:
        read_keras(path)
    assert caught.value.extra == "keras"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        read_keras(tmp_path / "nothing.keras")


# --- the Keras export: any size, the original on every window ----------------------------------


def _windows_match(original: keras.Model, exported: keras.Model, x_big: np.ndarray, window: int, stride: int) -> float:
    """Every position of the exported map against the original model on its input window (NHWC)."""
    scores = np.asarray(exported.predict(x_big, verbose=0), dtype=np.float64)
    grid = scores.shape[1:3]
    worst = 0.0
    for i in range(grid[0]):
        for j in range(grid[1]):
            crop = x_big[:, i * stride : i * stride + window, j * stride : j * stride + window, :]
            worst = max(worst, assert_close(scores[:, i, j, :], keras_outputs(original, crop)))
    return worst


def test_export_tutorial_8x8_gives_5x5(tmp_path: Path) -> None:
    model = tutorial(units=256)  # 4x4x256 map; a narrower Dense(1024) keeps the test fast
    kf = read_keras(save(model, tmp_path, "keras"))
    result = export_keras(kf, apply_plan(plan_keras(kf), kf.tensors), tmp_path / "tutorial_conv.keras")
    assert result.ok and result.written and result.input_shape == (None, None, 256)
    exported = keras.saving.load_model(result.path)
    assert [type(layer).__name__ for layer in exported.layers] == ["InputLayer", "Conv2D", "Conv2D"]
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 4, 256)).astype("float32")
    assert_close(np.asarray(exported.predict(x, verbose=0), np.float64).reshape(3, 10), keras_outputs(model, x))
    x_big = rng.standard_normal((2, 8, 8, 256)).astype("float32")
    assert exported.predict(x_big, verbose=0).shape == (2, 5, 5, 10)
    _windows_match(model, exported, x_big, window=4, stride=1)


def test_export_that_fails_its_check_writes_nothing(tmp_path: Path) -> None:
    """Kernels made with PyTorch's chw order for a channels-last head: the export measures it and keeps nothing."""
    kf = read_keras(save(trunk_model(), tmp_path, "keras"))
    tensors = dict(apply_plan(plan_keras(kf), kf.tensors))
    change = head_changes(kf.heads[0], kf)[0]
    tensors[change.weight] = fc_to_conv_weight(kf.tensors[change.weight], replace(change, flatten_order="chw"))
    result = export_keras(kf, tensors, tmp_path / "wrong.keras")
    assert not result.ok and not result.written and result.traced_max_abs_error > 1e-3
    assert not (tmp_path / "wrong.keras").exists()
    assert [p.name for p in tmp_path.iterdir() if "wrong" in p.name] == []


def test_export_with_a_nan_kernel_writes_nothing(tmp_path: Path) -> None:
    """A NaN in a converted kernel is an infinite error, never a pass."""
    kf = read_keras(save(trunk_model(), tmp_path, "keras"))
    tensors = dict(apply_plan(plan_keras(kf), kf.tensors))
    change = head_changes(kf.heads[0], kf)[0]
    tensors[change.weight] = tensors[change.weight].clone()
    tensors[change.weight][0, 0, 0, 0] = float("nan")
    result = export_keras(kf, tensors, tmp_path / "nan.keras")
    assert not result.ok and not result.written
    assert result.traced_max_abs_error == result.dense_max_abs_error == float("inf")
    assert not (tmp_path / "nan.keras").exists()


@pytest.mark.parametrize("kind", FORMATS)
def test_export_conv_trunk_runs_at_any_size(tmp_path: Path, kind: str) -> None:
    model = trunk_model()
    kf = read_keras(save(model, tmp_path, kind))
    result = export_keras(kf, apply_plan(plan_keras(kf), kf.tensors), tmp_path / "trunk_conv.keras")
    exported = keras.saving.load_model(result.path)
    assert exported.get_layer("dense_1").kernel.shape == (4, 4, 6, 12)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 10, 10, 3)).astype("float32")
    assert_close(np.asarray(exported.predict(x, verbose=0), np.float64).reshape(3, 5), keras_outputs(model, x))
    # 14x14 -> conv 12x12 -> pool 6x6 -> a 3x3 grid; position (i, j) is the 10x10 crop at (2i, 2j).
    _windows_match(model, exported, rng.standard_normal((2, 14, 14, 3)).astype("float32"), window=10, stride=2)


def test_export_functional_with_batchnorm_and_softmax_in_the_head(tmp_path: Path) -> None:
    model = functional_model()
    randomize_batchnorm(model)
    kf = read_keras(save(model, tmp_path, "keras"))
    result = export_keras(kf, apply_plan(plan_keras(kf), kf.tensors), tmp_path / "functional_conv.keras")
    assert result.ok and result.written
    exported = keras.saving.load_model(result.path)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 6, 6, 2)).astype("float32")
    assert_close(np.asarray(exported.predict(x, verbose=0), np.float64).reshape(3, 3), keras_outputs(model, x))
    # 8x8 -> conv 6x6 -> a 3x3 grid; valid convs and per-pixel BatchNorm: each position is the 6x6 crop at (i, j).
    _windows_match(model, exported, rng.standard_normal((2, 8, 8, 2)).astype("float32"), window=6, stride=1)


def test_export_channels_first_softmax_on_channels(tmp_path: Path) -> None:
    model = keras.Sequential(
        [
            keras.Input((3, 8, 8)),
            L.Conv2D(4, 3, data_format="channels_first", name="conv"),
            L.Flatten(name="flat"),
            L.Dense(6, activation="relu", name="fc1"),
            L.Dense(5, activation="softmax", name="fc2"),
        ]
    )
    kf = read_keras(save(model, tmp_path, "keras"))
    result = export_keras(kf, apply_plan(plan_keras(kf), kf.tensors), tmp_path / "cf.keras")
    assert result.input_shape == (3, None, None)
    exported = keras.saving.load_model(result.path)
    x = np.random.default_rng(8).standard_normal((3, 3, 8, 8)).astype("float32")
    assert_close(np.asarray(exported.predict(x, verbose=0), np.float64).reshape(3, 5), keras_outputs(model, x))
    x_big = np.random.default_rng(9).standard_normal((2, 3, 10, 10)).astype("float32")
    scores = np.asarray(exported.predict(x_big, verbose=0), np.float64)
    assert scores.shape == (2, 5, 3, 3)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)  # a softmax over the channels at every position
    for i in range(3):
        for j in range(3):
            assert_close(scores[:, :, i, j], keras_outputs(model, x_big[:, :, i : i + 8, j : j + 8]))


# --- the committed samples ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits_keras.keras", "digits_keras.h5"])
def test_committed_digits_samples(name: str) -> None:
    kf = read_keras(SAMPLES / name)
    (head,) = kf.heads
    assert (head.flatten, head.dense, head.feature_map, head.flatten_order) == (
        "flatten", ("fc1", "fc2"), InputShape(32, 4, 4), "hwc"
    )  # fmt: skip
    model = keras.saving.load_model(SAMPLES / name)
    x = np.random.default_rng(10).uniform(0, 1, (8, 8, 8, 1)).astype("float32")
    assert_close(torch_forward(model, kf, converted_tensors(kf), x), keras_outputs(model, x))


def test_weights_are_read_in_place_whether_the_zip_stores_or_compresses_them(tmp_path: Path) -> None:
    """Keras stores model.weights.h5 uncompressed (read in place, fast); a re-zipped, deflated file reads the same."""
    path = save(trunk_model(), tmp_path, "keras")
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("model.weights.h5").compress_type == zipfile.ZIP_STORED
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    deflated = tmp_path / "deflated.keras"
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    stored, compressed = read_keras(path), read_keras(deflated)
    assert [i.name for i in stored.infos] == [i.name for i in compressed.infos]
    for name in stored.tensors:
        assert torch.equal(stored.tensors[name], compressed.tensors[name]), name


def test_a_depthwise_conv_reads_from_both_keras_3_formats(tmp_path: Path) -> None:
    """Keras 3 saves a DepthwiseConv2D's kernel as "kernel" in .h5 (tf.keras 2: "depthwise_kernel")."""
    model = keras.Sequential(
        [keras.Input((6, 6, 3)), L.DepthwiseConv2D(3, name="dw"), L.Flatten(name="flat"), L.Dense(4, name="fc")],
        name="depthwise",
    )
    zipped, legacy = read_keras(save(model, tmp_path, "keras")), read_keras(save(model, tmp_path, "h5"))
    assert [i.name for i in zipped.infos] == [i.name for i in legacy.infos]
    for name in zipped.tensors:
        assert torch.equal(zipped.tensors[name], legacy.tensors[name]), name
    assert [h.feature_map for h in legacy.heads] == [InputShape(3, 4, 4)]


def test_convert_file_writes_the_keras_model_beside_the_weights(tmp_path: Path) -> None:
    from fc2conv import convert_file

    source = SAMPLES / "digits_keras.keras"
    result = convert_file(source, tmp_path / "w.safetensors", keras_out=tmp_path / "dense.keras")
    assert result.ok and result.written and (tmp_path / "w.safetensors").is_file()
    assert [(e.kind, e.ok) for e in result.exports] == [("keras", True)]
    exported = keras.saving.load_model(tmp_path / "dense.keras")
    original = keras.saving.load_model(source)
    x = np.random.default_rng(3).standard_normal((2, *original.inputs[0].shape[1:])).astype("float32")
    got = np.asarray(exported.predict(x, verbose=0), np.float64).reshape(2, -1)
    assert_close(got, keras_outputs(original, x))
