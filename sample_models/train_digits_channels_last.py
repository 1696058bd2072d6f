"""Train the channels-last digits sample: the digits CNN whose head flattens NHWC, as Keras does.

    pip install scikit-learn          # or: pip install -e ".[train]"
    python sample_models/train_digits_channels_last.py

Writes ``sample_models/digits_channels_last.safetensors`` (the state dict, ``metadata={"format": "pt"}``)
and prints the test accuracy. The network is :class:`sample_models.train_digits.DigitsCNN` except for
the flatten: the 32x4x4 map is permuted to (H, W, C) before it is flattened, so the first FC weight
is stored in PyTorch's (out, in) layout but its inputs are in (H, W, C) order, as in a weight taken
from a Keras/TensorFlow model. Its conv kernel is ``weight.reshape(64, 4, 4, 32).permute(0, 3, 1, 2)``
(``fc2conv convert --flatten-order hwc``); the plain reshape of a chw conversion is silently wrong.

Trained by ``train_digits.train`` itself (same data, split, optimiser, epochs and seeds), so the two
samples differ only in the flatten order; the weights are evidence for ``fc2conv.evidence``: they are
smooth in hwc order, not in chw.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # run as a script: make the repository importable, as examples/ does
    sys.path.insert(0, str(HERE.parent))

from sample_models.train_digits import train as train_digits  # noqa: E402

FILENAME = "digits_channels_last.safetensors"


class ChannelsLastFlatten(nn.Module):
    """Flatten an (N, C, H, W) map in (H, W, C) order, as Keras' ``Flatten`` does on an NHWC tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


class DigitsChannelsLastCNN(nn.Module):
    """1x8x8 -> conv 3x3 -> 16x6x6 -> conv 3x3 -> 32x4x4 -> NHWC flatten -> Linear(512, 64) -> ReLU -> Linear(64, 10)"""

    input_shape = (1, 8, 8)
    feature_shape = (32, 4, 4)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU())
        self.classifier = nn.Sequential(ChannelsLastFlatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train(epochs: int = 40) -> tuple[nn.Module, float]:
    """Train the channels-last digits CNN exactly as ``train_digits.train`` trains the channels-first one.

    Returns:
        The model (in eval mode) and its accuracy on the held-out digits.
    """
    model, accuracy, _, _ = train_digits(epochs, DigitsChannelsLastCNN)
    return model, accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    model, accuracy = train()
    path = args.out / FILENAME
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"format": "pt"})
    print(f"test accuracy {accuracy:.4f} on the held-out digits; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
