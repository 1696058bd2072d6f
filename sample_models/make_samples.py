"""Build the sample checkpoints deterministically (seeded init, fixed torch threads).

    python sample_models/make_samples.py            # rebuild the committed samples
    python sample_models/make_samples.py --seed-head  # also the seed's 256x4x4 -> 1024 -> 10 head (17 MB)
    python sample_models/make_samples.py --check    # exit 1 if a committed sample differs from a rebuild

``--check`` compares values with a tolerance of a few float32 roundings, not bytes: the random
initialisers may round differently on another CPU (vectorised and scalar paths).

The models are defined here so that tests (and readers) can load the weights into the very module
that produced them and compare its output with the converted convolutions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class SmallCNN(nn.Module):
    """A 3x16x16 image classifier: two conv blocks to a 32x4x4 map, then Flatten -> FC -> BN -> FC."""

    feature_shape = (32, 4, 4)

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 128),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(128, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNet(nn.Module):
    """LeNet-5: a 16x5x5 map flattened into 400 -> 120 -> 84 -> 10."""

    feature_shape = (16, 5, 5)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        return nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).view(x.size(0), -1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ChannelsLastHead(nn.Module):
    """A head as Keras builds it: the 8x3x5 map is flattened channels-last (H, W, C) into 120 -> 16 -> 4.

    Its FC weights are what a Keras/TensorFlow export holds (after transposing Dense kernels to
    PyTorch's (out, in)): converting them needs ``--flatten-order hwc``.
    """

    feature_shape = (8, 3, 5)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dense1 = nn.Linear(3 * 5 * 8, 16)
        self.dense2 = nn.Linear(16, 4)

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        flat = feature_map.permute(0, 2, 3, 1).reshape(feature_map.shape[0], -1)  # NHWC flatten
        return self.dense2(torch.relu(self.dense1(flat)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)))


class SeedHead(nn.Module):
    """The seed example: a 256x4x4 map -> Linear(4096, 1024) -> ReLU -> Linear(1024, 10)."""

    feature_shape = (256, 4, 4)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(64, 256, 3, padding=1), nn.ReLU())
        self.fc1 = nn.Linear(256 * 4 * 4, 1024)
        self.fc2 = nn.Linear(1024, 10)

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(feature_map, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = factory().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):  # non-trivial statistics, as after training
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


def build_small_cnn() -> dict[str, torch.Tensor]:
    """``small_cnn.pt``: a plain state dict."""
    return _seeded(SmallCNN, 0).state_dict()


def build_lenet_wrapped() -> dict[str, object]:
    """``lenet_wrapped.pth``: a training checkpoint, state dict under ``model_state_dict`` with ``module.``."""
    state = _seeded(LeNet, 1).state_dict()
    return {"epoch": 12, "model_state_dict": {f"module.{k}": v for k, v in state.items()}, "best_acc": 0.991}


def build_channels_last() -> dict[str, torch.Tensor]:
    """``channels_last_head.safetensors``: FC weights for a channels-last flatten."""
    return _seeded(ChannelsLastHead, 2).state_dict()


def build_seed_head() -> dict[str, torch.Tensor]:
    """``seed_head.pt``: the seed's exact head (17 MB in fp32, so generated, not committed)."""
    return _seeded(SeedHead, 3).state_dict()


COMMITTED = {
    "small_cnn.pt": build_small_cnn,
    "lenet_wrapped.pth": build_lenet_wrapped,
    "channels_last_head.safetensors": build_channels_last,
}
GENERATED = {"seed_head.pt": build_seed_head}


def write(name: str, builder: Callable[[], object], folder: Path = HERE) -> Path:
    """Build one sample and write it under ``folder``."""
    path = folder / name
    obj = builder()
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in obj.items()}, str(path), metadata={"format": "pt"})  # type: ignore[union-attr]
    else:
        torch.save(obj, path)
    return path


def _flat_tensors(path: Path) -> dict[str, object]:
    """Every value of a sample file, nested dicts flattened to dotted keys."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    flat: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            flat[prefix.rstrip(".")] = value

    walk("", torch.load(path, weights_only=True))
    return flat


def same_sample(rebuilt: Path, committed: Path) -> bool:
    """Same names, dtypes and shapes; floats equal to a few roundings, everything else exactly."""
    a, b = _flat_tensors(rebuilt), _flat_tensors(committed)
    if list(a) != list(b):
        return False
    for key, x in a.items():
        y = b[key]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            if x != y:
                return False
        elif x.dtype != y.dtype or x.shape != y.shape:
            return False
        elif x.is_floating_point():
            if not torch.allclose(x, y, rtol=1e-5, atol=1e-7):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-head", action="store_true", help="also write seed_head.pt (17 MB)")
    parser.add_argument("--check", action="store_true", help="compare committed samples with a rebuild")
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (tests run this in process)


def _run(args: argparse.Namespace) -> int:
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            stale = [n for n, b in COMMITTED.items() if not same_sample(write(n, b, Path(tmp)), HERE / n)]
        for name in stale:
            print(f"{name} differs from a rebuild", file=sys.stderr)
        return 1 if stale else 0
    builders = {**COMMITTED, **(GENERATED if args.seed_head else {})}
    for name, builder in builders.items():
        path = write(name, builder, args.out)
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
