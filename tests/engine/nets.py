"""Small, seeded networks shared by the engine tests (import these; don't redefine them)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks (one with BatchNorm), max pool, global average pool, linear head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class TinyMLP(nn.Module):
    """No conv layer at all: layer-based methods must report "not applicable"."""

    def __init__(self, in_features: int = 3 * 8 * 8, num_classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def randomize_batchnorm_stats(model: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorm layers non-trivial running stats and affine params (as training would)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def small_cnn(seed: int = 0, in_channels: int = 3, num_classes: int = 5) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(in_channels, num_classes)
    return randomize_batchnorm_stats(model, seed).eval()


def tiny_mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().eval()


def reestimate_batchnorm(
    model: nn.Module, size: int, seed: int = 0, batches: int = 4, batch_size: int = 16
) -> nn.Module:
    """BatchNorm running statistics measured on seeded inputs (a train-mode pass, cumulative
    averages), as training would leave them: deep random networks then keep their activations'
    scale instead of shrinking layer by layer, so their maps look like a trained model's."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for b in range(batches):
            model(images(batch_size, size, seed=seed + b))
    return model.eval()


def torchvision_model(
    arch: str, seed: int = 0, num_classes: int = 1000, *, statistics_at: int | None = None
) -> nn.Module:
    """A torchvision architecture with seeded random weights and realistic BatchNorm stats
    (random ones, or with ``statistics_at`` measured on inputs of that size)."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if statistics_at is not None:
        return reestimate_batchnorm(model, statistics_at, seed)
    return randomize_batchnorm_stats(model, seed).eval()


def images(n: int, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Seeded smooth-ish inputs (normalized scale), NCHW float32."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, channels, max(size // 4, 1), max(size // 4, 1), generator=g)
    smooth = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return (smooth + 0.1 * torch.randn(n, channels, size, size, generator=g)).float()


class Doubling(torch.autograd.Function):
    """The identity, with a backward that doubles: no relevance rule can see it."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, *grads: torch.Tensor) -> torch.Tensor:
        return 2 * grads[0]


class UnconservingCNN(nn.Module):
    """conv -> ReLU -> :class:`Doubling` -> mean -> linear: LRP's input relevance sums to twice
    the logit, whatever the rules."""

    def __init__(self, channels: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x))
        out = Doubling.apply(features)
        assert isinstance(out, torch.Tensor)
        return self.fc(out.mean(dim=(2, 3)))


class DeepChain(nn.Module):
    """``depth`` 3x3 convolutions of 2 channels with ReLUs, global average pool, linear head:
    many cheap randomization units (``depth + 1`` at module granularity), for the tests whose
    stage counts matter."""

    def __init__(self, depth: int = 35, num_classes: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 2, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def deep_chain(seed: int = 0, depth: int = 35) -> DeepChain:
    """Seeded, with near-identity convolutions (a Dirac kernel plus noise), so the signal and
    the maps survive 35 layers as a trained network's do."""
    torch.manual_seed(seed)
    model = DeepChain(depth)
    with torch.no_grad():
        for conv in model.features:
            if isinstance(conv, nn.Conv2d) and conv.in_channels == conv.out_channels:
                nn.init.dirac_(conv.weight)
                conv.weight.add_(0.2 * torch.randn_like(conv.weight))
    return model.eval()
