"""Write a Keras model whose FC heads are convolutions (runs at any input size), proven against the original in Keras.

Keras is imported here only, lazily (``KERAS_BACKEND`` defaults to ``torch``, which fc2conv already
needs). The original model is loaded by Keras itself (``safe_mode=True``, after fc2conv has checked
that every layer is a built-in Keras layer, so no code from the file runs); the head weights come from
the converted tensors, so the export also proves what ``convert`` writes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv.check import tolerance_for
from fc2conv.errors import CheckpointError, DependencyError, OutputError, PlanError
from fc2conv.formats.keras import KerasFile, KerasHead
from fc2conv.publish import atomic_output
from fc2conv.results import Tolerance

if TYPE_CHECKING:
    import torch

__all__ = ["KerasExport", "build_fully_convolutional", "export_keras", "require_keras"]

# Seeded inputs of the end-to-end check, and the larger maps of the position-by-position check.
SAMPLES = 4
WINDOW_SAMPLES = 2
WINDOW_GROWTH = 2


@dataclass(frozen=True)
class KerasExport:
    """What was written and how far it is from the original, measured in Keras.

    ``traced_max_abs_error``: the exported model vs the original on the same seeded inputs at the
    original input size (its 1x1 score maps against the original scores), every output.
    ``dense_max_abs_error``: on maps grown by ``WINDOW_GROWTH`` in H and W, every position of each
    converted head's output against the original head (Flatten and Dense layers) on that window.
    ``written``: the file is at ``path`` (only when ``ok``; a model that fails the check is not kept).
    """

    path: Path
    written: bool
    heads: tuple[str, ...]
    input_shape: tuple[int | None, ...]
    traced_max_abs_error: float
    dense_max_abs_error: float
    dense_grid: tuple[int, int]
    reference_scale: float
    tolerance: Tolerance

    @property
    def max_abs_error(self) -> float:
        return max(self.traced_max_abs_error, self.dense_max_abs_error)

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance.atol + self.tolerance.rtol * self.reference_scale


def require_keras() -> None:
    """Raise :class:`DependencyError` unless keras imports (the ``keras-export`` extra)."""
    _keras()


def _keras() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as exc:
        raise DependencyError(f"writing a Keras model needs the keras package ({exc})", extra="keras-export") from exc
    return keras


def _refuse_unsupported(kf: KerasFile) -> None:
    for layer in kf.layers:
        if not layer.builtin:
            raise PlanError(
                f"{kf.path}: layer {layer.name} ({layer.class_name}) is not a built-in Keras layer; fc2conv does "
                "not load a model whose code would run, so it cannot write its Keras export"
            )
        if layer.model:
            raise PlanError(
                f"{kf.path}: layer {layer.name} sits in nested model {layer.model}; the Keras export handles "
                "Sequential and Functional models without nested models"
            )
        if layer.calls > 1:
            raise PlanError(f"{kf.path}: layer {layer.name} is shared (called {layer.calls} times); not exported")


def _heads_to_export(kf: KerasFile, converted: Mapping[str, torch.Tensor]) -> list[KerasHead]:
    heads = []
    for head in kf.heads:
        weight = converted.get(f"{head.dense[0]}.weight")
        if weight is not None and weight.dim() == 4:
            heads.append(head)
        else:
            raise PlanError(
                f"{kf.path}: the head {head.flatten} -> {' -> '.join(head.dense)} was not converted; the Keras "
                "export makes the whole model convolutional, so it needs every head converted"
            )
    for refused in kf.refused:
        raise PlanError(refused.reason)
    if not heads:
        raise PlanError(f"{kf.path}: the model has no converted Flatten -> Dense head to export")
    return heads


def _output_layers(kf: KerasFile) -> list[str]:
    config = kf.config.get("config") or {}
    if kf.config.get("class_name") == "Sequential":
        return [kf.layers[-1].name]
    refs = config.get("output_layers")
    if isinstance(refs, list) and refs and isinstance(refs[0], str):
        return [refs[0]]
    return [ref[0] for ref in refs or []]


def _load_reference(kf: KerasFile) -> Any:
    keras = _keras()
    try:
        return keras.saving.load_model(kf.path, compile=False, safe_mode=True)
    except Exception as exc:  # keras raises many kinds; the message is what matters
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{kf.path}: Keras cannot load the model ({reason})") from exc


def build_fully_convolutional(kf: KerasFile, converted: Mapping[str, torch.Tensor]) -> tuple[Any, Any]:
    """Build the fully convolutional Keras model, and load the original, without saving anything.

    Each converted head loses its Flatten; its Dense layers become ``Conv2D`` layers of the same names
    (the first with the map's H x W kernel and ``padding="valid"``, the later ones 1x1), weights from
    ``converted`` (PyTorch's ``(out, C, H, W)`` -> Keras's ``(H, W, C, out)``). Image inputs get open
    H and W. Everything else is the original's layers, weights included. In a channels-first head, a
    softmax (as an activation or a layer) and BatchNormalization act on axis 1, the channels.

    Args:
        kf: The original file, read by :func:`~fc2conv.formats.keras.read_keras`.
        converted: Its tensors after conversion (``apply_plan``), at least the heads' Dense weights and biases.

    Returns:
        ``(model, reference)``: the new ``keras.Model`` and the original as Keras loads it.

    Raises:
        PlanError: the model has layers that are not built into Keras, nested or shared layers, or a
            head that was not converted.
    """
    _refuse_unsupported(kf)
    heads = _heads_to_export(kf, converted)
    keras = _keras()
    reference = _load_reference(kf)
    by_name = {layer.name: layer for layer in reference.layers}
    head_of_flatten = {head.flatten: head for head in heads}
    role: dict[str, tuple[KerasHead, int]] = {}
    for head in heads:
        for name in head.layers:
            role[name] = (head, head.dense.index(name) if name in head.dense else -1)
    formats = {head.map_format for head in heads}
    formats |= {
        str(layer.config.get("data_format"))
        for layer in kf.layers
        if layer.config.get("data_format") and "2D" in layer.class_name
    }
    if len(formats) != 1:
        raise PlanError(f"{kf.path}: the model mixes channels-first and channels-last layers; not exported")
    channels_first = formats == {"channels_first"}

    tensors: dict[str, Any] = {}
    inputs: list[Any] = []
    reference_inputs = list(reference.inputs)
    for layer in kf.layers:
        if layer.class_name == "InputLayer" or not layer.inputs:
            shape = tuple(reference_inputs[len(inputs)].shape[1:])
            if len(shape) == 3:
                shape = (shape[0], None, None) if channels_first else (None, None, shape[2])
            tensor = keras.Input(shape=shape, name=layer.name if layer.class_name == "InputLayer" else None)
            inputs.append(tensor)
            if layer.class_name == "InputLayer":
                tensors[layer.name] = tensor
                continue
            sources = [tensor]
        else:
            sources = [tensors[name] for name in layer.inputs]
        if layer.name in head_of_flatten:
            tensors[layer.name] = sources[0]
            continue
        original = by_name[layer.name]
        try:
            if layer.name in role:
                head, index = role[layer.name]
                tensors[layer.name] = _head_layer(keras, layer.name, original, head, index, sources[0], channels_first)
            else:
                tensors[layer.name] = original(sources[0] if len(sources) == 1 else sources)
        except (ValueError, TypeError, NotImplementedError) as exc:  # Keras refuses the layer on open-sized maps
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PlanError(
                f"{kf.path}: layer {layer.name} ({layer.class_name}) does not run on the fully convolutional "
                f"model's maps ({reason})"
            ) from exc
    outputs = [tensors[name] for name in _output_layers(kf)]
    model = keras.Model(
        inputs if len(inputs) > 1 else inputs[0], outputs if len(outputs) > 1 else outputs[0], name=reference.name
    )
    for head in heads:
        for dense in head.dense:
            kernel = converted[f"{dense}.weight"]
            values = [kernel.permute(2, 3, 1, 0).contiguous().numpy()]
            if f"{dense}.bias" in converted and by_name[dense].use_bias:
                values.append(converted[f"{dense}.bias"].numpy())
            model.get_layer(dense).set_weights(values)
    return model, reference


def _head_layer(keras: Any, name: str, original: Any, head: KerasHead, index: int, x: Any, channels_first: bool) -> Any:
    """One layer of a head on the map: a Dense becomes a Conv2D; axis-wise layers move to the channel axis."""
    data_format = "channels_first" if channels_first else "channels_last"
    feature_softmax = False
    if index >= 0:  # a Dense
        config = original.get_config()
        activation = config.get("activation", "linear")
        if channels_first and activation in ("softmax", "log_softmax"):
            if activation == "log_softmax":
                raise PlanError(f"layer {name}: log_softmax over channels-first maps has no Keras layer; not exported")
            activation, feature_softmax = "linear", True
        size = (head.feature_map.height, head.feature_map.width) if index == 0 else (1, 1)
        conv = keras.layers.Conv2D(
            filters=config["units"],
            kernel_size=size,
            padding="valid",
            data_format=data_format,
            activation=activation,
            use_bias=config.get("use_bias", True),
            name=name,
            dtype=original.dtype_policy,
        )
        out = conv(x)
        if feature_softmax:
            out = keras.layers.Softmax(axis=1, name=f"{name}_softmax")(out)
        return out
    cls = type(original).__name__
    if cls == "BatchNormalization":  # built for (N, units): a new one over the channel axis of the map
        config = {**original.get_config(), "axis": 1 if channels_first else -1}
        layer = keras.layers.BatchNormalization.from_config(config)
        out = layer(x)
        layer.set_weights(original.get_weights())
        return out
    if not channels_first:
        return original(x)  # the last axis is the channel axis, as it was the feature axis
    if cls == "Softmax" or (cls == "Activation" and original.get_config().get("activation") == "softmax"):
        return keras.layers.Softmax(axis=1, name=name)(x)
    if cls == "Activation" and original.get_config().get("activation") == "log_softmax":
        raise PlanError(f"layer {name}: log_softmax over channels-first maps has no Keras layer; not exported")
    return original(x)


def export_keras(
    kf: KerasFile,
    converted: Mapping[str, torch.Tensor],
    output: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    seed: int = 0,
) -> KerasExport:
    """Write the fully convolutional model as a ``.keras`` file, after proving it in Keras.

    The model (see :func:`build_fully_convolutional`) is saved to a temporary file beside ``output``,
    loaded back by Keras, and measured against the original: end to end at the original input size,
    and position by position on larger maps for each head. Only if both are within the tolerance of
    the heads' dtype is it renamed to ``output``.

    Args:
        kf: The original file.
        converted: Its tensors after conversion.
        output: Where to write; must end in ``.keras``.
        overwrite: Replace an existing file.
        seed: Seed of the check's random inputs.

    Returns:
        The :class:`KerasExport` with the measured errors and the verdict; when it is not ``ok``,
        nothing was written (``written`` is False) and the caller decides how to report it.

    Raises:
        OutputError: ``output`` does not end in ``.keras``, exists (without ``overwrite``), or its
            folder is missing.
        DependencyError: keras is not installed.
        PlanError, CheckpointError: see :func:`build_fully_convolutional`.
    """
    target = Path(output)
    if target.suffix != ".keras":
        raise OutputError(f"{target}: a Keras export is a .keras file", remedy="choose_output")
    model, reference = build_fully_convolutional(kf, converted)
    keras = _keras()
    try:
        # A named temporary file: Keras writes to a path, and one that ends in .keras.
        with atomic_output(target, overwrite=overwrite, protect=[kf.path], named=True) as temporary:
            model.save(temporary)
            written = keras.saving.load_model(temporary, compile=False, safe_mode=True)
            result = _measure(kf, reference, written, target, seed, converted)
            if not result.ok:
                raise _Discard
    except _Discard:
        return result  # the model failed its check: nothing was written
    return replace(result, written=True)


class _Discard(Exception):
    """Raised inside the atomic write to drop an export whose check failed."""


def _numpy(keras: Any, value: Any) -> Any:
    return keras.ops.convert_to_numpy(value)


def _measure(
    kf: KerasFile, reference: Any, model: Any, target: Path, seed: int, converted: Mapping[str, torch.Tensor]
) -> KerasExport:
    import numpy as np

    keras = _keras()
    rng = np.random.default_rng(seed)
    heads = list(kf.heads)
    dtype = str(converted[f"{heads[0].dense[0]}.weight"].dtype).removeprefix("torch.")
    tolerance = tolerance_for(dtype)

    # End to end, at the original size: the 1x1 score maps against the original scores.
    samples = [rng.standard_normal((SAMPLES, *tuple(t.shape[1:]))).astype("float32") for t in reference.inputs]
    feed_ref = samples if len(samples) > 1 else samples[0]
    expected = reference(feed_ref, training=False)
    got = model(feed_ref, training=False)
    expected = [expected] if not isinstance(expected, (list, tuple)) else list(expected)
    got = [got] if not isinstance(got, (list, tuple)) else list(got)
    traced, scale = 0.0, 0.0
    for want, have in zip(expected, got, strict=True):
        want, have = _numpy(keras, want).astype("float64"), _numpy(keras, have).astype("float64")
        have = have.reshape(want.shape)
        traced = max(traced, float(np.max(np.abs(want - have))))
        scale = max(scale, float(np.max(np.abs(want))))

    # Position by position: each converted head on a larger map against the original head per window.
    dense = 0.0
    grid = (WINDOW_GROWTH + 1, WINDOW_GROWTH + 1)
    for head in heads:
        m = head.feature_map
        cf = head.map_format == "channels_first"
        shape = (m.channels, m.height + WINDOW_GROWTH, m.width + WINDOW_GROWTH)
        big = rng.standard_normal((WINDOW_SAMPLES, *(shape if cf else (shape[1], shape[2], shape[0])))).astype(
            "float32"
        )
        conv_out = big
        for name in head.layers:
            conv_out = model.get_layer(name)(conv_out, training=False)
            if any(layer.name == f"{name}_softmax" for layer in model.layers):
                conv_out = model.get_layer(f"{name}_softmax")(conv_out)
        conv_out = _numpy(keras, conv_out).astype("float64")
        for i in range(grid[0]):
            for j in range(grid[1]):
                window = (
                    big[:, :, i : i + m.height, j : j + m.width] if cf else big[:, i : i + m.height, j : j + m.width]
                )
                ref_out = reference.get_layer(head.flatten)(window)
                for name in head.layers:
                    ref_out = reference.get_layer(name)(ref_out, training=False)
                ref_out = _numpy(keras, ref_out).astype("float64")
                position = conv_out[:, :, i, j] if cf else conv_out[:, i, j, :]
                dense = max(dense, float(np.max(np.abs(ref_out - position))))
                scale = max(scale, float(np.max(np.abs(ref_out))))
    input_shape = tuple(model.inputs[0].shape[1:])
    return KerasExport(
        path=target,
        written=False,
        heads=tuple(h.flatten for h in heads),
        input_shape=input_shape,
        traced_max_abs_error=traced,
        dense_max_abs_error=dense if math.isfinite(dense) else math.inf,
        dense_grid=grid,
        reference_scale=scale,
        tolerance=tolerance,
    )
