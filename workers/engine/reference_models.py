"""The reference benchmark's two architectures: a plain CNN and a small residual network.

Both are built so that the sanity checks have something to bite on. The children of the root
module are the natural randomization stages of cascading model parameter randomization
(Adebayo et al. 2018, section 3.1): ``SmallCNN`` is ``block1, block2, block3, pool, fc`` and
``SmallResNet`` is ``stem, layer1, layer2, layer3, pool, fc``, so "randomize from ``fc`` down
to ``block2``" is a walk over ``named_children()`` in reverse.

Every non-linearity is its own ``nn.ReLU`` module (not ``F.relu``, never in place): Guided
Backprop and LRP hook ReLU modules, and an in-place op would overwrite the activation they need.
The residual addition is a plain ``+``; it exports as an ONNX ``Add`` node, which the ONNX
converter turns into the ``Add`` module LRP needs (``saliency_audit.workers.engine.models.layers``).

The last spatial feature map is 8x8 for a 32x32 input in both networks, so CAM-family maps at
the last block have the same resolution for both.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import SpecError


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class SmallCNN(nn.Module):
    """Three conv blocks (conv-BN-ReLU; max pool after the first two; two convs in the last),
    global average pool, linear head.

    Channel widths 16-32-64: about 61k parameters, about 250 kB as ONNX.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.block1 = nn.Sequential(*_conv_bn_relu(in_channels, w1), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*_conv_bn_relu(w1, w2), nn.MaxPool2d(2))
        # Two convs in the last block: a 26-pixel receptive field, enough to see a whole shape
        # (one conv, 18 pixels, left the CNN guessing between squares and circles).
        self.block3 = nn.Sequential(*_conv_bn_relu(w2, w3), *_conv_bn_relu(w3, w3))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(self.pool(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a skip connection, ReLU after the sum (He et al. 2016).

    When the block changes resolution or width the skip is a strided 1x1 conv with BatchNorm,
    as in ResNet's option B; otherwise it is the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Conv stem, three stages of residual blocks (16-32-64 wide), global average pool, head.

    ``layer1`` halves the resolution and ``layer2`` halves it again, then ``layer3`` widens at
    8x8 (for a 32x32 input), keeping the cost close to :class:`SmallCNN`. ``blocks_per_stage``
    residual blocks per stage; with the default of one, about 80k parameters (about 320 kB as
    ONNX).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
        blocks_per_stage: int = 1,
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, w1))
        self.layer1 = self._stage(w1, w1, stride=2, blocks=blocks_per_stage)
        self.layer2 = self._stage(w1, w2, stride=2, blocks=blocks_per_stage)
        self.layer3 = self._stage(w2, w3, stride=1, blocks=blocks_per_stage)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(w3, num_classes)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, stride: int, blocks: int) -> nn.Sequential:
        first = BasicBlock(in_channels, out_channels, stride)
        rest = [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(first, *rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


REFERENCE_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "small_cnn": SmallCNN,
    "small_resnet": SmallResNet,
}


def build_reference_model(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    """One of :data:`REFERENCE_ARCHITECTURES` by name, with torch's default initialization."""
    try:
        cls = REFERENCE_ARCHITECTURES[arch]
    except KeyError:
        known = ", ".join(REFERENCE_ARCHITECTURES)
        raise SpecError(f"unknown reference architecture {arch!r} (known: {known})") from None
    return cls(in_channels=in_channels, num_classes=num_classes)
