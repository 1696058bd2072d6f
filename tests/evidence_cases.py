"""The weights fc2conv.evidence is validated on, for tests/test_evidence.py and benchmarks/evidence_margins.py.

A trained case is a small CNN whose head flattens its feature map in a given order (``chw`` as PyTorch
does, ``hwc`` as Keras does) into ``Linear(C*H*W, 64)``, trained for a few seconds on scikit-learn's
bundled 8x8 digits or on synthetic smooth images (blurred bars, 4 orientations), seeded and
single-threaded. What is measured is that first FC weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sample_models.train_digits import load_data, reproducible

HIDDEN = 64


class FlattenIn(nn.Module):
    """Flatten an (N, C, H, W) map in ``chw`` order (PyTorch) or ``hwc`` order (Keras, NHWC)."""

    def __init__(self, order: str) -> None:
        super().__init__()
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if self.order == "chw" else x.permute(0, 2, 3, 1).flatten(1)


@dataclass(frozen=True)
class TrainedCase:
    """A feature extractor, the map it gives, and the data it is trained on.

    ``expect`` is the verdict the evidence must give: ``"clear"`` (the right order), ``"weak"`` (maps
    that are tiny, 2x2, or come out of max pooling on these small images carry almost no structure
    within a channel), or ``"not wrong"`` (clear or weak; with two channels one of the two
    statistics is blind). No case may ever give the wrong order.
    """

    name: str
    data: str  # "digits" or "bars"
    features: Callable[[], nn.Module]
    map_shape: tuple[int, int, int]
    expect: str
    epochs: int = 8


TRAINED_CASES: tuple[TrainedCase, ...] = (
    TrainedCase("digits 32x4x4", "digits", lambda: nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU()), (32, 4, 4), "clear"),
    TrainedCase("digits 24x4x6 (non-square)", "digits", lambda: nn.Sequential(
        nn.Conv2d(1, 16, (3, 1)), nn.ReLU(), nn.Conv2d(16, 24, 3), nn.ReLU()), (24, 4, 6), "clear"),
    TrainedCase("digits 8x6x6", "digits", lambda: nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU()), (8, 6, 6), "clear"),
    TrainedCase("digits 4x8x8 (C < H*W)", "digits", lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()), (4, 8, 8), "clear"),
    # Two channels: the unexplained variance cannot tell the orders apart (module docstring).
    TrainedCase("digits 2x8x8 (C = 2)", "digits", lambda: nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()), (2, 8, 8), "not wrong"),
    TrainedCase("digits 64x2x2", "digits", lambda: nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 64, 3), nn.ReLU()),
        (64, 2, 2), "weak"),
    TrainedCase("digits 64x2x2 (max pool)", "digits", lambda: nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)), (64, 2, 2), "weak"),
    TrainedCase("digits 32x3x3 (max pool)", "digits", lambda: nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()),
        (32, 3, 3), "weak"),
    TrainedCase("bars 16x8x8 (max pool)", "bars", lambda: nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()), (16, 8, 8), "clear", 6),
    TrainedCase("bars 32x5x6 (avg pool, non-square)", "bars", lambda: nn.Sequential(
        nn.Conv2d(1, 16, (3, 1)), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3), nn.ReLU()), (32, 5, 6), "clear", 6),
)  # fmt: skip


def bars(count: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic smooth images: one blurred bar at a random place, 4 orientations (the label), plus noise.

    Args:
        count: Number of images.
        size: Side of the square images.
        seed: Seed of the draw.

    Returns:
        Images ``(count, 1, size, size)`` and labels ``(count,)`` in 0..3.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (count,), generator=generator)
    angles = labels.double() * math.pi / 4
    centres = torch.rand(count, 2, generator=generator, dtype=torch.float64) * (size / 2) + size / 4
    grid = torch.arange(size, dtype=torch.float64)
    y, x = grid[:, None], grid[None, :]
    dy = y[None] - centres[:, 0, None, None]
    dx = x[None] - centres[:, 1, None, None]
    along = dx * angles.cos()[:, None, None] + dy * angles.sin()[:, None, None]
    across = -dx * angles.sin()[:, None, None] + dy * angles.cos()[:, None, None]
    images = torch.exp(-(across**2) / 2) * torch.sigmoid(size / 5 - along.abs())
    images = images + 0.15 * torch.randn(images.shape, generator=generator, dtype=torch.float64)
    return images.float().unsqueeze(1), labels


def dataset(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of the digits or of the bars."""
    if name == "digits":
        return load_data()
    x, y = bars(1500)
    return x[:1200], y[:1200], x[1200:], y[1200:]


def train_first_fc(case: TrainedCase, order: str, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Train ``case`` with its head flattening in ``order``; return the first FC weight and the test accuracy.

    Seeded and single-threaded (``reproducible()``), so the caller's torch settings are restored.
    """
    x_train, y_train, x_test, y_test = dataset(case.data)
    classes = int(y_train.max()) + 1
    with reproducible():
        torch.manual_seed(seed)
        model = nn.Sequential(
            case.features(),
            FlattenIn(order),
            nn.Linear(math.prod(case.map_shape), HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, classes),
        )
        with torch.no_grad():
            assert model[0](x_train[:1]).shape[1:] == case.map_shape, case.name
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        generator = torch.Generator().manual_seed(seed + 1)
        for _ in range(case.epochs):
            for batch in torch.randperm(len(y_train), generator=generator).split(64):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
                optimizer.step()
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return model[2].weight.detach().clone(), accuracy


# Random, untrained weights: (map, rows). The statistic must claim nothing on any of them.
RANDOM_CASES: tuple[tuple[tuple[int, int, int], int], ...] = (
    ((32, 4, 4), 64),
    ((64, 2, 2), 64),
    ((2, 2, 2), 10),
    ((3, 5, 7), 16),
    ((2, 8, 8), 32),
    ((16, 1, 8), 64),
    ((24, 4, 6), 8),
    ((128, 3, 3), 100),
    ((512, 7, 7), 256),
)


def random_weight(map_shape: tuple[int, int, int], rows: int, seed: int, init: str = "kaiming") -> torch.Tensor:
    """An untrained FC weight: ``nn.Linear``'s default (Kaiming uniform) init, or standard normal."""
    generator = torch.Generator().manual_seed(seed)
    features = math.prod(map_shape)
    if init == "normal":
        return torch.randn(rows, features, generator=generator)
    bound = 1 / math.sqrt(features)
    return (torch.rand(rows, features, generator=generator) * 2 - 1) * bound


SYNTHETIC_KINDS = (
    "smooth maps",
    "smooth maps, channel scales",
    "smooth maps, channel and position offsets",
    "channel offsets",
    "position offsets",
    "smooth position offsets",
)


def synthetic_weight(
    kind: str, map_shape: tuple[int, int, int], order: str, rows: int = 64, seed: int = 0
) -> torch.Tensor:
    """A weight with a known structure, flattened in ``order``: i.i.d. noise plus the ``kind`` of structure.

    "smooth maps": every channel of every row a blurred random field (twice the noise's scale);
    "channel scales": those maps times a random scale per channel; "offsets": a random constant per
    channel and/or per position (across channels), with no smoothness within a channel. Offsets are
    what fools the single statistics (module docstring of fc2conv.evidence); the verdict must then be
    the right order or none.
    """
    generator = torch.Generator().manual_seed(seed)
    c, h, w = map_shape
    noise = torch.randn(rows, c, h, w, generator=generator)
    channel_offsets = 3 * torch.randn(rows, c, 1, 1, generator=generator)
    position_offsets = 3 * torch.randn(rows, 1, h, w, generator=generator)
    structure = {
        "smooth maps": lambda: 2 * _smooth_fields(rows, c, h, w, generator),
        "smooth maps, channel scales": lambda: (
            2 * _smooth_fields(rows, c, h, w, generator) * torch.randn(rows, c, 1, 1, generator=generator).exp()
        ),
        "smooth maps, channel and position offsets": lambda: (
            2 * _smooth_fields(rows, c, h, w, generator) + channel_offsets + position_offsets
        ),
        "channel offsets": lambda: channel_offsets,
        "position offsets": lambda: position_offsets,
        "smooth position offsets": lambda: 3 * _smooth_fields(rows, 1, h, w, generator),
    }[kind]()
    maps = noise + structure
    return maps.flatten(1) if order == "chw" else maps.permute(0, 2, 3, 1).flatten(1)


def _smooth_fields(rows: int, c: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """Random fields blurred by a Gaussian of 1.5 pixels, scaled to unit standard deviation."""
    margin = 4
    fields = torch.randn(rows * c, 1, h + 2 * margin, w + 2 * margin, generator=generator)
    taps = torch.exp(-(torch.arange(-margin, margin + 1, dtype=torch.float32) ** 2) / (2 * 1.5**2))
    taps /= taps.sum()
    fields = nn.functional.conv2d(fields, taps.view(1, 1, 1, -1))
    fields = nn.functional.conv2d(fields, taps.view(1, 1, -1, 1))
    fields = fields.view(rows, c, h, w)
    return fields / fields.std()
