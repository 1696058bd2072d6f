"""The end-to-end proof of a converted module: the original and the converted model on the same inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fc2conv.check import tolerance_for
from fc2conv.graph.rewrite import conversion_of, param_dtype, trace
from fc2conv.results import ModuleCheck, Tolerance
from fc2conv.types import InputShape, dtype_name

if TYPE_CHECKING:
    import torch
    from torch import fx, nn

__all__ = ["MAX_POSITIONS", "check_module"]

MAX_POSITIONS = 16


def check_module(
    original: nn.Module,
    converted: nn.Module,
    *,
    seed: int = 0,
    samples: int = 2,
    tolerance: Tolerance | None = None,
) -> ModuleCheck:
    """Run both models end to end: at the traced size, and densely on an input twice as large.

    Both run as float64 copies: an exact rewrite differs by summation order only (~1e-16); a folded
    BatchNorm carries the model dtype's rounding, so the dtype's tolerance is the default bar. The
    dense check reads the converted model's feature map of the large input, and runs the *original*
    model's head (the traced original graph, with the window injected where the feature map is) on
    windows of it (at most :data:`MAX_POSITIONS`, seeded, corners included). A forward may return one
    tensor or a tuple, list or dict of them (several heads); each is compared.

    Args:
        original: The model as it was.
        converted: Its conversion by :func:`fc2conv.convert_module`.
        seed: Seed of the random inputs and of the positions checked.
        samples: Batch size at the traced size.
        tolerance: Pass threshold (``abs <= atol + rtol * max|output|``); default: the model dtype's.
    """
    import copy

    import torch

    record = conversion_of(converted)
    tolerance = tolerance or tolerance_for(dtype_name(param_dtype(original)))
    generator = torch.Generator().manual_seed(seed)
    reference = copy.deepcopy(original).double().eval()
    candidate = copy.deepcopy(converted).double().eval()
    shape = record.input_shape
    x = torch.randn(samples, shape.channels, shape.height, shape.width, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        expected, got = _leaves(reference(x)), _leaves(candidate(x))
    traced = _Tally()
    for want, have in zip(expected, got, strict=True):
        traced.add(have.reshape(want.shape), want)
    big = torch.randn(1, shape.channels, 2 * shape.height, 2 * shape.width, generator=generator, dtype=torch.float64)
    dense, grid, positions = _dense_errors(reference, candidate, big, generator)
    how = (
        f"original vs converted model (float64 copies) at {shape}, and on a 2x larger input: {positions} of the "
        f"{'x'.join(map(str, grid))} output positions against the original head on their windows"
    )
    return ModuleCheck(
        max_abs_error=traced.error, max_rel_error=traced.relative, dense_max_abs_error=dense.error,
        dense_max_rel_error=dense.relative, dense_grid=grid, positions_checked=positions, tolerance=tolerance,
        reference_scale=traced.scale, dense_reference_scale=dense.scale, how=how,
    )  # fmt: skip


class _Tally:
    """The largest difference and the largest reference value seen."""

    def __init__(self) -> None:
        self.error, self.scale = 0.0, 0.0

    def add(self, got: torch.Tensor, expected: torch.Tensor) -> None:
        self.error = max(self.error, float((got - expected).abs().max()) if got.numel() else 0.0)
        self.scale = max(self.scale, float(expected.abs().max()) if expected.numel() else 0.0)

    @property
    def relative(self) -> float:
        return self.error / self.scale if self.scale else self.error


def _dense_errors(
    reference: nn.Module, candidate: nn.Module, big: torch.Tensor, generator: torch.Generator
) -> tuple[_Tally, tuple[int, int], int]:
    """Each output position of the converted model on ``big`` against the original head on its window."""
    import torch

    record = conversion_of(candidate)
    with torch.no_grad():
        feature_map, output = _capture(candidate, record.feature_node, big)
    dense = [d[:, :, None, None] if d.dim() == 2 else d for d in _leaves(output)]  # squeezed 1x1 maps
    grid = (dense[0].shape[2], dense[0].shape[3])
    fh, fw = record.feature_shape.height, record.feature_shape.width
    positions = _positions(grid, generator)
    head = _HeadRunner(trace(reference), record.feature_node)
    tally = _Tally()
    with torch.no_grad():
        for i, j in positions:
            window = feature_map[:, :, i : i + fh, j : j + fw].contiguous()  # view() needs it
            for scores, expected in zip(dense, _leaves(head(window, record.input_shape)), strict=True):
                tally.add(scores[:, :, i, j], expected.reshape(1, -1))
    return tally, grid, len(positions)


def _leaves(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output: one, or those of a tuple, list or dict (several heads), in order."""
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(output) if hasattr(leaf, "shape")]


def _positions(grid: tuple[int, int], generator: torch.Generator) -> list[tuple[int, int]]:
    import torch

    every = [(i, j) for i in range(grid[0]) for j in range(grid[1])]
    if len(every) <= MAX_POSITIONS:
        return every
    corners = {(0, 0), (0, grid[1] - 1), (grid[0] - 1, 0), (grid[0] - 1, grid[1] - 1)}
    order = torch.randperm(len(every), generator=generator).tolist()
    chosen = list(corners) + [every[k] for k in order if every[k] not in corners]
    return sorted(chosen[:MAX_POSITIONS])


def _capture(module: nn.Module, node_name: str, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The value of one graph node, and the output, of a GraphModule run on ``x``."""
    from torch import fx

    captured: dict[str, Any] = {}

    class Capture(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n.name == node_name:
                captured["value"] = value
            return value

    output = Capture(module).run(x)
    return captured["value"], output


class _HeadRunner:
    """Runs a traced original model with a given tensor standing in for one node (the feature map)."""

    def __init__(self, traced: fx.GraphModule, node_name: str) -> None:

        self.traced = traced
        self.node_name = node_name
        needed = set()
        target = next(n for n in traced.graph.nodes if n.name == node_name)
        stack = [n for n in traced.graph.nodes if n.op == "output"]
        while stack:  # the nodes the output depends on, not going past the injected node
            node = stack.pop()
            if node in needed:
                continue
            needed.add(node)
            if node is not target:
                stack.extend(a for a in node.all_input_nodes)
        self.needed = needed

    def __call__(self, window: torch.Tensor, shape: InputShape) -> torch.Tensor:
        import torch
        from torch import fx

        node_name, needed = self.node_name, self.needed

        class Inject(fx.Interpreter):
            def run_node(self, n: Any) -> Any:
                if n.name == node_name:
                    return window
                if n not in needed:
                    return None
                return super().run_node(n)

        dummy = torch.zeros(1, shape.channels, shape.height, shape.width, dtype=window.dtype)
        return Inject(self.traced).run(dummy)
