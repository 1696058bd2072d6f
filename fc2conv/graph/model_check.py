"""The end-to-end proof of a converted module: the original and the converted model on the same inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fc2conv.check import tolerance_for
from fc2conv.graph.rewrite import conversion_of, param_dtype
from fc2conv.results import ModuleCheck
from fc2conv.types import InputShape, dtype_name

if TYPE_CHECKING:
    import torch
    from torch import fx, nn

__all__ = ["MAX_POSITIONS", "check_module"]

MAX_POSITIONS = 16


def check_module(original: nn.Module, converted: nn.Module, *, seed: int = 0, samples: int = 2) -> ModuleCheck:
    """Run both models end to end: at the traced size, and densely on an input twice as large.

    The dense check reads the converted model's feature map of the large input, and runs the
    *original* model's head (the traced original graph, with the window injected where the
    feature map is) on every window of it (at most :data:`MAX_POSITIONS`, seeded, corners included).
    """
    import copy

    import torch
    from torch import fx

    record = conversion_of(converted)
    # float64 copies of both models: an exact rewrite differs by summation order only (~1e-16); a
    # folded BatchNorm carries the model dtype's rounding, so the dtype's rtol is the bar.
    tolerance = tolerance_for(dtype_name(param_dtype(original))).rtol
    generator = torch.Generator().manual_seed(seed)
    reference = copy.deepcopy(original).double().eval()
    candidate = copy.deepcopy(converted).double().eval()
    shape = record.input_shape
    x = torch.randn(samples, shape.channels, shape.height, shape.width, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x)
        got = candidate(x)
    got = got.reshape(expected.shape)
    scale = float(expected.abs().max())
    abs_error = float((got - expected).abs().max())

    big = torch.randn(1, shape.channels, 2 * shape.height, 2 * shape.width, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        feature_map, dense = _capture(candidate, record.feature_node, big)
    if dense.dim() == 2:  # squeezed output of a 1x1 map
        dense = dense[:, :, None, None]
    grid = (dense.shape[2], dense.shape[3])
    fh, fw = record.feature_shape.height, record.feature_shape.width
    positions = _positions(grid, generator)
    head = _HeadRunner(fx.symbolic_trace(reference), record.feature_node)
    dense_abs, dense_scale = 0.0, 0.0
    with torch.no_grad():
        for i, j in positions:
            window = feature_map[:, :, i : i + fh, j : j + fw].contiguous()  # view() needs it
            expected_here = head(window, shape)
            dense_abs = max(dense_abs, float((dense[:, :, i, j] - expected_here.reshape(1, -1)).abs().max()))
            dense_scale = max(dense_scale, float(expected_here.abs().max()))
    return ModuleCheck(
        max_abs_error=abs_error,
        max_rel_error=abs_error / scale if scale else abs_error,
        dense_max_abs_error=dense_abs,
        dense_max_rel_error=dense_abs / dense_scale if dense_scale else dense_abs,
        dense_grid=grid,
        positions_checked=len(positions),
        tolerance=tolerance,
    )


def _positions(grid: tuple[int, int], generator: torch.Generator) -> list[tuple[int, int]]:
    import torch

    every = [(i, j) for i in range(grid[0]) for j in range(grid[1])]
    if len(every) <= MAX_POSITIONS:
        return every
    corners = {(0, 0), (0, grid[1] - 1), (grid[0] - 1, 0), (grid[0] - 1, grid[1] - 1)}
    order = torch.randperm(len(every), generator=generator).tolist()
    chosen = list(corners) + [every[k] for k in order if every[k] not in corners]
    return sorted(chosen[:MAX_POSITIONS])


def _capture(module: nn.Module, node_name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
