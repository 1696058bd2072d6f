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
from fc2conv.formats.keras import KerasFile, KerasHead, KerasLayer
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
    """The keras module, on the PyTorch backend unless ``KERAS_BACKEND`` says otherwise."""
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
    """Every head of the model, each converted (its first Dense a 4-D kernel), and none refused."""
    for head in kf.heads:
        weight = converted.get(f"{head.dense[0]}.weight")
        if weight is None or weight.dim() != 4:
            raise PlanError(
                f"{kf.path}: the head {head.flatten} -> {' -> '.join(head.dense)} was not converted; the Keras "
                "export makes the whole model convolutional, so it needs every head converted"
            )
    if kf.refused:
        raise PlanError(kf.refused[0].reason)
    if not kf.heads:
        raise PlanError(f"{kf.path}: the model has no converted Flatten -> Dense head to export")
    return list(kf.heads)


def _load_reference(kf: KerasFile) -> Any:
    keras = _keras()
    try:
        return keras.saving.load_model(kf.path, compile=False, safe_mode=True)
    except Exception as exc:  # keras raises many kinds; the message is what matters
        raise CheckpointError(f"{kf.path}: Keras cannot load the model ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
        CheckpointError: Keras cannot load the original.
    """
    _refuse_unsupported(kf)
    heads = _heads_to_export(kf, converted)
    keras = _keras()
    reference = _load_reference(kf)
    channels_first = _channels_first(kf, heads)
    model = _Rebuild(keras, kf, reference, heads, channels_first).model()
    for head in heads:
        for dense in head.dense:
            kernel = converted[f"{dense}.weight"]
            values = [kernel.permute(2, 3, 1, 0).contiguous().numpy()]  # (out, C, H, W) -> (H, W, C, out)
            if f"{dense}.bias" in converted and reference.get_layer(dense).use_bias:
                values.append(converted[f"{dense}.bias"].numpy())
            model.get_layer(dense).set_weights(values)
    return model, reference


def _channels_first(kf: KerasFile, heads: list[KerasHead]) -> bool:
    """Whether the model's maps are channels-first; one layout throughout, or the export is refused."""
    formats = {head.map_format for head in heads}
    formats |= {
        str(layer.config.get("data_format"))
        for layer in kf.layers
        if layer.config.get("data_format") and "2D" in layer.class_name
    }
    if len(formats) != 1:
        raise PlanError(f"{kf.path}: the model mixes channels-first and channels-last layers; not exported")
    return formats == {"channels_first"}


class _Rebuild:
    """The original's graph called again, layer by layer, on inputs of open H and W, with each head on the map."""

    def __init__(self, keras: Any, kf: KerasFile, reference: Any, heads: list[KerasHead], channels_first: bool) -> None:
        self.keras = keras
        self.kf = kf
        self.reference = reference
        self.channels_first = channels_first
        self.flattens = {head.flatten for head in heads}  # dropped: a converted head reads the map itself
        self.head_of = {name: head for head in heads for name in head.layers}
        self.tensors: dict[str, Any] = {}  # layer name -> its output in the new graph
        self.inputs: list[Any] = []

    def model(self) -> Any:
        """The new ``keras.Model``: the original's inputs and outputs, each layer called in config order."""
        for layer in self.kf.layers:
            if layer.class_name == "InputLayer" or not layer.inputs:
                tensor = self._open_input(layer)
                if layer.class_name == "InputLayer":
                    self.tensors[layer.name] = tensor
                    continue
                sources = [tensor]
            else:
                sources = [self.tensors[name] for name in layer.inputs]
            if layer.name in self.flattens:
                self.tensors[layer.name] = sources[0]
                continue
            self.tensors[layer.name] = self._call(layer, sources)
        inputs, outputs = self.inputs, [self.tensors[name] for name in self.kf.outputs]
        return self.keras.Model(
            inputs if len(inputs) > 1 else inputs[0],
            outputs if len(outputs) > 1 else outputs[0],
            name=self.reference.name,
        )

    def _open_input(self, layer: KerasLayer) -> Any:
        """The model's next input, as the original's, but an image input with open H and W."""
        shape = tuple(self.reference.inputs[len(self.inputs)].shape[1:])
        if len(shape) == 3:
            shape = (shape[0], None, None) if self.channels_first else (None, None, shape[2])
        tensor = self.keras.Input(shape=shape, name=layer.name if layer.class_name == "InputLayer" else None)
        self.inputs.append(tensor)
        return tensor

    def _call(self, layer: KerasLayer, sources: list[Any]) -> Any:
        original = self.reference.get_layer(layer.name)
        head = self.head_of.get(layer.name)
        try:
            if head is not None and layer.name in head.dense:
                return _dense_as_conv(self.keras, original, head, sources[0], self.channels_first)
            if head is not None:
                return _feature_layer_on_map(self.keras, original, sources[0], self.channels_first)
            return original(sources[0] if len(sources) == 1 else sources)
        except (ValueError, TypeError, NotImplementedError) as exc:  # Keras refuses the layer on open-sized maps
            raise PlanError(
                f"{self.kf.path}: layer {layer.name} ({layer.class_name}) does not run on the fully convolutional "
                f"model's maps ({_first_line(exc)})"
            ) from exc


def _dense_as_conv(keras: Any, original: Any, head: KerasHead, x: Any, channels_first: bool) -> Any:
    """A head's Dense as the Conv2D computing it at every position: the first over the map's H x W, later ones 1x1.

    A softmax activation over a channels-first map becomes a Softmax layer over axis 1 after the conv.
    """
    config = original.get_config()
    activation = config.get("activation", "linear")
    softmax_on_channels = channels_first and activation in ("softmax", "log_softmax")
    if softmax_on_channels:
        if activation == "log_softmax":
            raise _no_channels_first_log_softmax(original.name)
        activation = "linear"
    first = original.name == head.dense[0]
    conv = keras.layers.Conv2D(
        filters=config["units"],
        kernel_size=(head.feature_map.height, head.feature_map.width) if first else (1, 1),
        padding="valid",
        data_format="channels_first" if channels_first else "channels_last",
        activation=activation,
        use_bias=config.get("use_bias", True),
        name=original.name,
        dtype=original.dtype_policy,
    )
    out = conv(x)
    if softmax_on_channels:
        out = keras.layers.Softmax(axis=1, name=_softmax_name(original.name))(out)
    return out


def _feature_layer_on_map(keras: Any, original: Any, x: Any, channels_first: bool) -> Any:
    """A head's layer over the features (BatchNormalization, softmax) moved to the map's channel axis."""
    cls = type(original).__name__
    if cls == "BatchNormalization":  # built for (N, units): a new one over the channel axis of the map
        config = {**original.get_config(), "axis": 1 if channels_first else -1}
        layer = keras.layers.BatchNormalization.from_config(config)
        out = layer(x)
        layer.set_weights(original.get_weights())
        return out
    if not channels_first:
        return original(x)  # the last axis is the channel axis, as it was the feature axis
    activation = original.get_config().get("activation") if cls == "Activation" else None
    if cls == "Softmax" or activation == "softmax":
        return keras.layers.Softmax(axis=1, name=original.name)(x)
    if activation == "log_softmax":
        raise _no_channels_first_log_softmax(original.name)
    return original(x)


def _no_channels_first_log_softmax(name: str) -> PlanError:
    return PlanError(f"layer {name}: log_softmax over channels-first maps has no Keras layer; not exported")


def _softmax_name(dense: str) -> str:
    """The Softmax layer added after a channels-first head's Dense whose activation was a softmax."""
    return f"{dense}_softmax"


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


def _measure(
    kf: KerasFile, reference: Any, model: Any, target: Path, seed: int, converted: Mapping[str, torch.Tensor]
) -> KerasExport:
    """The written model against the original, in Keras, on seeded inputs: the :class:`KerasExport`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    heads = kf.heads
    dtype = str(converted[f"{heads[0].dense[0]}.weight"].dtype).removeprefix("torch.")
    terms = max(converted[f"{name}.weight"][0].numel() for head in heads for name in head.dense)
    traced, scale = _end_to_end_error(reference, model, rng)
    dense = 0.0
    for head in heads:
        head_error, head_scale = _window_error(reference, model, head, rng)
        dense, scale = max(dense, head_error), max(scale, head_scale)
    return KerasExport(
        path=target,
        written=False,
        heads=tuple(h.flatten for h in heads),
        input_shape=tuple(model.inputs[0].shape[1:]),
        traced_max_abs_error=traced,
        dense_max_abs_error=dense,
        dense_grid=(WINDOW_GROWTH + 1, WINDOW_GROWTH + 1),
        reference_scale=scale,
        tolerance=tolerance_for(dtype, terms=terms),
    )


def _end_to_end_error(reference: Any, model: Any, rng: Any) -> tuple[float, float]:
    """At the original input size: the largest difference of the 1x1 score maps from the original
    scores, every output, and the largest original score (the scale)."""
    import numpy as np

    samples = [rng.standard_normal((SAMPLES, *tuple(t.shape[1:]))).astype("float32") for t in reference.inputs]
    feed = samples if len(samples) > 1 else samples[0]
    expected = _outputs(reference(feed, training=False))
    got = _outputs(model(feed, training=False))
    error, scale = 0.0, 0.0
    for want, have in zip(expected, got, strict=True):
        want, have = _float64(want), _float64(have)
        error = max(error, _largest_difference(want, have.reshape(want.shape)))
        scale = max(scale, float(np.max(np.abs(want))))
    return error, scale


def _window_error(reference: Any, model: Any, head: KerasHead, rng: Any) -> tuple[float, float]:
    """On a map grown by ``WINDOW_GROWTH``: the largest difference of the converted head's output at
    each position from the original head on that position's window, and the largest original output."""
    import numpy as np

    m = head.feature_map
    channels_first = head.map_format == "channels_first"
    grown = (m.channels, m.height + WINDOW_GROWTH, m.width + WINDOW_GROWTH)
    big_shape = grown if channels_first else (grown[1], grown[2], grown[0])
    big = rng.standard_normal((WINDOW_SAMPLES, *big_shape)).astype("float32")
    conv_out = _float64(_run_converted_head(model, head, big))
    error, scale = 0.0, 0.0
    for i in range(WINDOW_GROWTH + 1):
        for j in range(WINDOW_GROWTH + 1):
            if channels_first:
                window, position = big[:, :, i : i + m.height, j : j + m.width], conv_out[:, :, i, j]
            else:
                window, position = big[:, i : i + m.height, j : j + m.width], conv_out[:, i, j, :]
            ref_out = _float64(_run_original_head(reference, head, window))
            error = max(error, _largest_difference(ref_out, position))
            scale = max(scale, float(np.max(np.abs(ref_out))))
    return error, scale


def _largest_difference(want: Any, have: Any) -> float:
    """The largest absolute difference; infinite if either side has a NaN (``max`` would drop a NaN)."""
    import numpy as np

    error = float(np.max(np.abs(want - have)))
    return math.inf if math.isnan(error) else error


def _run_converted_head(model: Any, head: KerasHead, x: Any) -> Any:
    """The converted head's layers (and any Softmax added after a Dense) on a map."""
    added = {layer.name for layer in model.layers}
    for name in head.layers:
        x = model.get_layer(name)(x, training=False)
        if _softmax_name(name) in added:
            x = model.get_layer(_softmax_name(name))(x)
    return x


def _run_original_head(reference: Any, head: KerasHead, window: Any) -> Any:
    """The original head, Flatten included, on one window of the map."""
    x = reference.get_layer(head.flatten)(window)
    for name in head.layers:
        x = reference.get_layer(name)(x, training=False)
    return x


def _outputs(value: Any) -> list[Any]:
    """A model's outputs as a list, whether it returns one tensor or several."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _float64(value: Any) -> Any:
    return _keras().ops.convert_to_numpy(value).astype("float64")
