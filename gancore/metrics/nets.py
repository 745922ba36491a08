"""The small classifiers the project trains itself as domain feature extractors.

Each net splits into `features(x) -> (B, D)` (the penultimate layer, before its activation) and `head(f) -> (B, 10)`
(the logits). Features are taken before the ReLU so that no unit is constantly zero: FID fits a Gaussian to them,
and a dead unit would make the covariance singular and the matrix square root noisy.
Inputs are float images in [-1, 1] at the net's native size (the extractor wrapper converts uint8 and resizes).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LeNet(nn.Module):
    """LeNet-5 with wider convolutions, for 28x28 greyscale digits/clothes (84-d features)."""

    feature_dim = 84

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)  # (B, 1, 28, 28) -> (B, 16, 28, 28), pooled to 14
        self.conv2 = nn.Conv2d(16, 32, 5)  # (B, 16, 14, 14) -> (B, 32, 10, 10), pooled to 5
        self.fc1 = nn.Linear(32 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, self.feature_dim)
        self.fc3 = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)  # (B, 84), pre-activation

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CifarNet(nn.Module):
    """Three conv blocks + one hidden layer for 32x32 RGB (256-d features); ~7M MACs per image, CPU-trainable."""

    feature_dim = 256

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        # (B, 3, 32, 32) -> (B, 32, 16, 16) -> (B, 48, 8, 8) -> (B, 96, 4, 4)
        self.body = nn.Sequential(block(3, 32), block(32, 48), block(48, 96))
        self.fc1 = nn.Linear(96 * 4 * 4, self.feature_dim)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.body(x).flatten(1))  # (B, 256), pre-activation

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(f)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
