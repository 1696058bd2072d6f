"""Small versions of the layouts people convert (no torchvision needed), for the module tests.

Each model has ``features(x)`` (everything before the flatten) and ``head(map)`` (the original head
on a feature map), so a test can compare the converted network with the original head on every
window of a larger feature map.
"""

from __future__ import annotations

import torch
from torch import nn


class VGGStyle(nn.Module):
    """features -> AdaptiveAvgPool2d((3, 3)) -> Flatten -> Linear/ReLU/Dropout x2 -> Linear."""

    input_shape = (3, 24, 24)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn.Sequential(
            nn.Linear(16 * 3 * 3, 32), nn.ReLU(True), nn.Dropout(),
            nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(),
            nn.Linear(32, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(feature_map, 1))


class AlexNetStyle(nn.Module):
    """Pool to 6x6, flatten, then Dropout before the first Linear (as torchvision's AlexNet)."""

    input_shape = (3, 27, 27)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(8 * 6 * 6, 24), nn.ReLU(inplace=True),
            nn.Dropout(), nn.Linear(24, 24), nn.ReLU(inplace=True), nn.Linear(24, 7),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(feature_map, 1))


class LeNetStyle(nn.Module):
    """A forward with ``x.view(x.size(0), -1)`` and functional activations."""

    input_shape = (1, 28, 28)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        return nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.fc3(nn.functional.relu(self.fc2(nn.functional.relu(self.fc1(x)))))

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = feature_map.reshape(feature_map.shape[0], -1)
        return self.fc3(nn.functional.relu(self.fc2(nn.functional.relu(self.fc1(x)))))


class ResNetStyle(nn.Module):
    """A global average pool before the fc: the head becomes a 1x1 conv and the pool stays."""

    input_shape = (3, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, 5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.avgpool(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.stem(x))
        x = x.reshape(x.shape[0], -1)
        return self.fc(x)

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.fc(feature_map.flatten(1))


class MLPHeadBN(nn.Module):
    """Flatten -> Linear -> BatchNorm1d -> ReLU -> Linear."""

    input_shape = (3, 12, 12)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU())
        self.head_layers = nn.Sequential(
            nn.Flatten(), nn.Linear(6 * 6 * 6, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_layers(self.features(x))

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.head_layers(feature_map)


ARCHITECTURES = [VGGStyle, AlexNetStyle, LeNetStyle, ResNetStyle, MLPHeadBN]


def build(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    """A seeded model in eval mode, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = cls().eval()
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


class TimmLinear(nn.Linear):
    """timm's ``Linear``: an nn.Linear subclass whose forward calls F.linear itself (torch.fx traces into it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class TimmStyle(nn.Module):
    """A classifier whose head layers are TimmLinear."""

    input_shape = (3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1, self.fc2 = TimmLinear(8 * 3 * 3, 16), TimmLinear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.features(x), 1))))

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(feature_map, 1))))


class TwoHeadsStyle(nn.Module):
    """A classifier and a box regressor on one flattened map; the forward returns both, as a tuple."""

    input_shape = (3, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.cls = nn.Linear(4 * 4 * 4, 5)
        self.box = nn.Sequential(nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = torch.flatten(self.features(x), 1)
        return self.cls(flat), self.box(flat)
