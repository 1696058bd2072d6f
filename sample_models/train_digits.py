"""Train the digits sample: a small CNN on scikit-learn's bundled 8x8 digits (no download).

    pip install scikit-learn          # or: pip install -e ".[train]"
    python sample_models/train_digits.py

Writes ``sample_models/digits_cnn.pt`` (the state dict) and ``sample_models/digits_examples.pt``
(a few test digits and their labels, for the demo), and prints the test accuracy. Seeded and
single-threaded, so a rerun on the same CPU reproduces the committed files byte for byte in a few
seconds; another CPU rounds differently, and its weights differ by a few percent while the accuracy
and the predictions stay the same (tests/test_examples.py checks exactly that).

The convolutions have no padding and there is no pooling, so the network is exactly translation
equivariant: once its head is convolutional, its score at each position of a large canvas equals
the original network on the 8x8 crop at that position.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class DigitsCNN(nn.Module):
    """1x8x8 -> conv 3x3 -> 16x6x6 -> conv 3x3 -> 32x4x4 -> Flatten -> Linear(512, 64) -> ReLU -> Linear(64, 10)."""

    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def digits_cnn() -> DigitsCNN:
    """The factory for ``fc2conv convert --model sample_models.train_digits:digits_cnn``."""
    return DigitsCNN()


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1797 digits as (N, 1, 8, 8) floats in [0, 1], split 80/20 with a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    return images[train], labels[train], images[test], labels[test]


@contextlib.contextmanager
def reproducible() -> Iterator[None]:
    """Seeded, single-threaded, deterministic algorithms; the caller's torch settings come back after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_rng_state(rng)


def train(
    epochs: int = 40, model_factory: Callable[[], nn.Module] = DigitsCNN
) -> tuple[nn.Module, float, torch.Tensor, torch.Tensor]:
    """Train the digits CNN (or another network on the same data, seeds and schedule).

    Returns:
        The model (in eval mode), its test accuracy and the test split.
    """
    with reproducible():
        return _train(epochs, model_factory)


def _train(epochs: int, model_factory: Callable[[], nn.Module]) -> tuple[nn.Module, float, torch.Tensor, torch.Tensor]:
    x_train, y_train, x_test, y_test = load_data()
    model = model_factory()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y_train), generator=generator).split(64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return model, accuracy, x_test, y_test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into")
    args = parser.parse_args(argv)
    model, accuracy, x_test, y_test = train()
    torch.save(model.state_dict(), args.out / "digits_cnn.pt")
    torch.save({"images": x_test[:40].clone(), "labels": y_test[:40].clone()}, args.out / "digits_examples.pt")
    print(f"test accuracy {accuracy:.4f} on {len(y_test)} held-out digits; wrote {args.out / 'digits_cnn.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
