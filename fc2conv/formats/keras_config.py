"""A Keras model's config read as data: its layers, what each reads, the shapes Keras recorded.

The config (``config.json`` of a ``.keras`` file, the ``model_config`` attribute of an ``.h5``) is
walked once, nested Sequential and Functional models included; nothing in it runs (a Lambda layer's
code stays a string). Layer names are qualified by the models that hold them (``trunk.conv1``), and
each model's layers are kept in the order Keras saves their weights (a Sequential omits its
InputLayer, a Functional keeps it). Both config styles are read: Keras 3's ``__keras_tensor__`` call
arguments and tf.keras 2's ``[[layer, node, tensor, kwargs], ...]`` inbound nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fc2conv.errors import CheckpointError

__all__ = [
    "ELEMENTWISE",
    "ELEMENTWISE_ACTIVATIONS",
    "FEATURE_ACTIVATIONS",
    "MERGE",
    "PASS_THROUGH",
    "SPATIAL_2D",
    "ConfigLayer",
    "ConfigModel",
    "ModelGraph",
    "Shape",
    "read_config",
]

Shape = tuple[int | None, ...]  # a shape as Keras records it: batch first, None where it is open

# --- what Keras's layer classes do ----------------------------------------------------------------

_CONTAINERS = {"Sequential", "Functional", "Model"}

# Layers that act on each value alone: allowed anywhere in a head, including between the Flatten and
# the first Dense (they commute with the flatten).
ELEMENTWISE = {
    "Dropout",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    "Identity",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "ThresholdedReLU",
}
ELEMENTWISE_ACTIVATIONS = {
    "linear", "relu", "relu6", "sigmoid", "tanh", "elu", "selu", "softplus", "softsign", "swish", "silu",
    "gelu", "exponential", "hard_sigmoid", "hard_silu", "hard_swish", "leaky_relu", "mish", "log_sigmoid",
    "celu", "hard_tanh", "squareplus", "sparse_plus", "soft_shrink", "hard_shrink", "tanh_shrink",
    "threshold",
}  # fmt: skip
# Over the last axis of a (N, units) tensor: valid after a Dense (one position, the units are the channels).
FEATURE_ACTIVATIONS = {"softmax", "log_softmax"}

# Layers whose ``data_format`` says where a map's channels are.
SPATIAL_2D = {
    "Conv2D",
    "Conv2DTranspose",
    "DepthwiseConv2D",
    "SeparableConv2D",
    "MaxPooling2D",
    "AveragePooling2D",
    "ZeroPadding2D",
    "Cropping2D",
    "UpSampling2D",
    "SpatialDropout2D",
}
# Shape-preserving layers that a walk back to the map's producer may pass through.
PASS_THROUGH = ELEMENTWISE | {"Activation", "Softmax", "BatchNormalization", "LayerNormalization", "Rescaling"}
MERGE = {"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"}

_TENSOR_CLASS = "__keras_tensor__"  # how Keras 3 serialises a tensor passed to a layer call
_LAMBDA_CLASSES = ("Lambda", "TFOpLambda", "SlicingOpLambda")


# --- what the walk returns ------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigLayer:
    """One layer as the config describes it.

    ``name`` is qualified by the models holding it, ``short`` is its own name; ``inputs`` are the
    qualified names of the layers it reads (its first call); ``model`` is the qualified name of the
    (nested) model holding it, ``""`` at the top level.
    """

    name: str
    short: str
    class_name: str
    config: Mapping[str, Any]
    inputs: tuple[str, ...]
    model: str
    calls: int  # how many times the model calls it (a shared layer: more than 1)
    builtin: bool  # a layer class of Keras itself (not custom, not Lambda): its behaviour is known
    recorded_shape: Shape | None = None  # the input shape Keras recorded for it, if any
    shape_from_build_config: bool = False  # recorded by its build config (else by its input's config)

    @property
    def data_format(self) -> str:
        """Where this layer's maps keep their channels; Keras's default is channels-last."""
        return str(self.config.get("data_format") or "channels_last")

    @property
    def quantized(self) -> bool:
        """Whether its weights are stored quantized (int8, float8, GPTQ, AWQ): not float kernels."""
        dtype = self.config.get("dtype")
        policy = dtype.get("class_name", "") if isinstance(dtype, dict) else ""
        quantized_policy = "Quantized" in policy or "GPTQ" in policy or "AWQ" in policy
        return quantized_policy or bool(self.config.get("quantization_config"))


@dataclass(frozen=True)
class ConfigModel:
    """A (nested) model: its qualified name and its children, in the order Keras saves their weights."""

    name: str
    class_name: str  # "Sequential" or "Functional": names the model's weights group in a .keras file
    children: tuple[ConfigLayer | ConfigModel, ...]

    def leaves(self) -> list[ConfigLayer]:
        """Every layer below this model, nested models' layers included, in weight-saving order."""
        out: list[ConfigLayer] = []
        for child in self.children:
            out.extend(child.leaves() if isinstance(child, ConfigModel) else [child])
        return out


@dataclass(frozen=True)
class ModelGraph:
    """The whole config: the top-level model, every layer by qualified name, the model's outputs."""

    root: ConfigModel
    layers: Mapping[str, ConfigLayer]  # in config order, which is an order the model can run in
    outputs: tuple[str, ...]  # the layers whose outputs the model returns


def read_config(path: Path, config: Mapping[str, Any]) -> ModelGraph:
    """Walk a model config (a dict with ``class_name`` and ``config``) into a :class:`ModelGraph`.

    Raises:
        CheckpointError: the model is not Sequential or Functional (a subclassed model's structure is
            code), a layer has no name or shares one, or a layer reads one the config has not defined.
            Config entries of the wrong type raise KeyError, TypeError, ...; the reader words those.
    """
    walker = _ConfigWalker(path)
    root, outputs = walker.model(config, "", None, top=True)
    return ModelGraph(root, dict(walker.layers), tuple(outputs))


# --- the walk -------------------------------------------------------------------------------------


class _ConfigWalker:
    """One pass over the config: each model's layers in order, with the names of what they read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.layers: dict[str, ConfigLayer] = {}

    def model(
        self, entry: Mapping[str, Any], prefix: str, outer_inputs: list[str] | None, *, top: bool = False
    ) -> tuple[ConfigModel, list[str]]:
        """A (nested) model and the qualified names of the layers giving its outputs."""
        class_name = entry.get("class_name")
        config = entry.get("config")
        name = (config.get("name") if isinstance(config, dict) else None) or entry.get("name") or ""
        qualified = "" if top else prefix + name
        if class_name == "Sequential":
            return self._sequential(entry, qualified, outer_inputs)
        if class_name in ("Functional", "Model") and isinstance(config, dict) and "layers" in config:
            return self._functional(entry, qualified, outer_inputs)
        what = "the file's model" if top else f"nested model {qualified}"
        raise CheckpointError(
            f"{self.path}: {what} is a {class_name!r}; fc2conv reads Sequential and Functional models "
            "(a subclassed model's structure is code, not config)"
        )

    def _layer(
        self, entry: Mapping[str, Any], model: str, inputs: list[str], calls: int, input_shape: Shape | None
    ) -> ConfigLayer:
        """Record one (non-model) layer; ``input_shape`` is what its caller knows of the shape it reads."""
        config: Mapping[str, Any] = entry["config"] if isinstance(entry.get("config"), dict) else {}
        short = entry.get("name") or config.get("name")
        if not isinstance(short, str) or not short:
            raise CheckpointError(f"{self.path}: a {entry.get('class_name')} layer in the config has no name")
        name = f"{model}.{short}" if model else short
        if name in self.layers:
            raise CheckpointError(f"{self.path}: two layers are named {name!r} in the config")
        built = _shape_tuple((entry.get("build_config") or {}).get("input_shape"))
        layer = ConfigLayer(
            name=name,
            short=short,
            class_name=str(entry.get("class_name")),
            config=config,
            inputs=tuple(inputs),
            model=model,
            calls=calls,
            builtin=_is_builtin(entry),
            recorded_shape=built or input_shape,
            shape_from_build_config=bool(built),
        )
        self.layers[name] = layer
        return layer

    def _sequential(
        self, entry: Mapping[str, Any], name: str, outer_inputs: list[str] | None
    ) -> tuple[ConfigModel, list[str]]:
        """Each layer reads the one before it; the first reads the outer model's input, if nested."""
        config = entry.get("config")
        layers = config.get("layers") if isinstance(config, dict) else config  # Keras 2.0-2.2: a list
        if not isinstance(layers, list):
            raise CheckpointError(f"{self.path}: Sequential model {name or '(top level)'} lists no layers")
        children: list[ConfigLayer | ConfigModel] = []
        previous = list(outer_inputs or [])
        build_shape = _shape_tuple((entry.get("build_config") or {}).get("input_shape"))
        if build_shape is None and isinstance(config, dict):
            build_shape = _shape_tuple(config.get("build_input_shape"))
        for index, layer in enumerate(layers):
            self._require_entry(layer, index, name)
            if layer.get("class_name") in _CONTAINERS:
                child, previous = self.model(layer, f"{name}." if name else "", previous or None)
                children.append(child)
                continue
            declared = _declared_input_shape(layer)
            if index == 0 and declared is None and not previous:
                declared = build_shape
            node = self._layer(layer, name, previous[:1], 1, declared)
            previous = [node.name]
            if not (index == 0 and node.class_name == "InputLayer"):  # Sequential.layers omits its InputLayer
                children.append(node)
        return ConfigModel(name, "Sequential", tuple(children)), previous

    def _functional(
        self, entry: Mapping[str, Any], name: str, outer_inputs: list[str] | None
    ) -> tuple[ConfigModel, list[str]]:
        """Layers read what their first call's arguments name; a nested model's inputs are the outer ones."""
        config = entry["config"]
        children: list[ConfigLayer | ConfigModel] = []
        outputs_of: dict[str, list[str]] = {}  # short layer name -> qualified layer(s) giving its output
        input_names = _layer_refs(config.get("input_layers"))
        for index, layer in enumerate(config["layers"]):
            self._require_entry(layer, index, name)
            short = str(layer.get("name") or (layer.get("config") or {}).get("name"))
            call_nodes = layer.get("inbound_nodes") or []
            refs = _tensor_refs(call_nodes[0]) if call_nodes else []
            inputs = self._call_inputs(short, refs, outputs_of)
            if layer.get("class_name") == "InputLayer" and outer_inputs is not None and short in input_names:
                position = input_names.index(short)
                inputs = [outer_inputs[position]] if position < len(outer_inputs) else []
            if layer.get("class_name") in _CONTAINERS:
                if len(call_nodes) > 1:
                    raise CheckpointError(
                        f"{self.path}: nested model {short!r} is called {len(call_nodes)} times; "
                        "fc2conv reads models whose nested models are called once"
                    )
                child, outputs = self.model(layer, f"{name}." if name else "", inputs)
                children.append(child)
                outputs_of[short] = outputs
                continue
            shape = refs[0][1] if len(refs) == 1 else None
            if layer.get("class_name") == "InputLayer":
                shape = _declared_input_shape(layer)
            node = self._layer(layer, name, inputs, max(1, len(call_nodes)), shape)
            children.append(node)
            outputs_of[node.short] = [node.name]
        outputs = [out for ref in _layer_refs(config.get("output_layers")) for out in outputs_of.get(ref, [])[:1]]
        return ConfigModel(name, "Functional", tuple(children)), outputs

    def _call_inputs(
        self, short: str, refs: list[tuple[str, Shape | None]], outputs_of: Mapping[str, list[str]]
    ) -> list[str]:
        """The qualified layers a call reads, each defined earlier in the config."""
        inputs = []
        for ref, _ in refs:
            if ref not in outputs_of:
                raise CheckpointError(
                    f"{self.path}: layer {short!r} reads {ref!r}, which the config does not define before it"
                )
            inputs.extend(outputs_of[ref][:1])
        return inputs

    def _require_entry(self, layer: Any, index: int, model: str) -> None:
        if not isinstance(layer, dict):
            raise CheckpointError(f"{self.path}: layer {index} of {model or 'the model'} is not a config entry")


# --- reading config values ------------------------------------------------------------------------


def _shape_tuple(value: Any) -> Shape | None:
    """A recorded shape (a list, or a serialised TensorShape), or None if it is not one map's shape."""
    if isinstance(value, dict) and "shape" in value:  # a serialized TensorShape / KerasTensor config
        value = value["shape"]
    if not isinstance(value, (list, tuple)):
        return None
    if value and isinstance(value[0], (list, tuple)):  # several inputs: not one map
        return None
    out: list[int | None] = []
    for dim in value:
        if dim is None or (isinstance(dim, int) and not isinstance(dim, bool)):
            out.append(dim)
        else:
            return None
    return tuple(out)


def _declared_input_shape(entry: Mapping[str, Any]) -> Shape | None:
    """The input shape a layer declares itself: ``batch_shape`` (Keras 3) or ``batch_input_shape`` (Keras 2)."""
    config = entry.get("config") or {}
    return _shape_tuple(config.get("batch_shape")) or _shape_tuple(config.get("batch_input_shape"))


def _tensor_refs(call_node: Any) -> list[tuple[str, Shape | None]]:
    """The (layer, shape) of every tensor a call node reads, for both config styles."""
    refs: list[tuple[str, Shape | None]] = []

    def keras3(value: Any) -> None:
        if isinstance(value, dict):
            if value.get("class_name") == _TENSOR_CLASS:
                config = value.get("config", {})
                history = config.get("keras_history") or []
                if history and isinstance(history[0], str):
                    refs.append((history[0], _shape_tuple(config.get("shape"))))
                return
            for item in value.values():
                keras3(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                keras3(item)

    if isinstance(call_node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        keras3(call_node.get("args", []))
    elif isinstance(call_node, (list, tuple)):  # tf.keras 2: [[layer, node_index, tensor_index, kwargs], ...]
        for item in call_node:
            if isinstance(item, (list, tuple)) and item and isinstance(item[0], str):
                refs.append((item[0], None))
    return refs


def _layer_refs(value: Any) -> list[str]:
    """``input_layers`` / ``output_layers``: ``[name, 0, 0]`` or ``[[name, 0, 0], ...]``."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return [value[0]]
    if isinstance(value, dict):  # a dict of named inputs
        return [n for item in value.values() for n in _layer_refs(item)]
    if isinstance(value, (list, tuple)):
        return [n for item in value for n in _layer_refs(item)]
    return []


def _is_builtin(entry: Mapping[str, Any]) -> bool:
    """A layer class that Keras itself defines, so what it computes is known without running code."""
    if entry.get("class_name") in _LAMBDA_CLASSES:
        return False
    if entry.get("registered_name") not in (None, entry.get("class_name")):
        return False
    module = entry.get("module")
    return module is None or str(module).startswith("keras")
