"""Architectures in the registry: small test/demo nets, CIFAR ResNets, torchvision classifiers."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from harden.models.registry import register_arch


class SmallCNN(nn.Module):
    """Four conv+BN blocks and a linear head: trains on 32x32 digits in seconds on a CPU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32):
        super().__init__()
        chans = [in_channels, width, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling, no BatchNorm: the classic MNIST-sized network."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
                                        nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, preact: bool = False):
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes if preact else planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            shortcut: list[nn.Module] = [nn.Conv2d(in_planes, planes, 1, stride, bias=False)]
            if not preact:
                shortcut.append(nn.BatchNorm2d(planes))
            self.shortcut = nn.Sequential(*shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            out = F.relu(self.bn1(x))
            skip = self.shortcut(out) if len(self.shortcut) else x
            out = self.conv1(out)
            out = self.conv2(F.relu(self.bn2(out)))
            return out + skip
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with a 3x3 stride-1 stem for 32x32 inputs (the CIFAR variant used by the papers)."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3, preact: bool = False,
                 widths: tuple[int, int, int, int] = (64, 128, 256, 512)):
        super().__init__()
        self.preact = preact
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[0], blocks[0], 1)
        self.layer2 = self._make_layer(widths[1], blocks[1], 2)
        self.layer3 = self._make_layer(widths[2], blocks[2], 2)
        self.layer4 = self._make_layer(widths[3], blocks[3], 2)
        self.bn_final = nn.BatchNorm2d(widths[3]) if preact else nn.Identity()
        self.linear = nn.Linear(widths[3], num_classes)

    def _make_layer(self, planes: int, count: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (count - 1):
            layers.append(_BasicBlock(self.in_planes, planes, s, preact=self.preact))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn_final(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


@register_arch("small_cnn", default_input=(3, 32, 32))
def small_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 32) -> nn.Module:
    """Small 4-layer CNN with BatchNorm (demo, tests, zoo)."""
    return SmallCNN(num_classes, in_channels, width)


@register_arch("lenet5", default_input=(1, 28, 28))
def lenet5(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """LeNet-5 (ReLU, max-pool, no BatchNorm) for 28x28 inputs: a third zoo architecture, another input geometry."""
    return LeNet5(num_classes, in_channels)


@register_arch("resnet8_narrow", default_input=(3, 32, 32))
def resnet8_narrow(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Narrow 8-layer CIFAR ResNet (one block per stage, widths 16..128): a second cheap zoo architecture."""
    return CifarResNet((1, 1, 1, 1), num_classes, in_channels, widths=(16, 32, 64, 128))


@register_arch("resnet18_cifar", default_input=(3, 32, 32))
def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-18 with a CIFAR stem (3x3 conv, no max-pool)."""
    return CifarResNet((2, 2, 2, 2), num_classes, in_channels)


@register_arch("preact_resnet18", default_input=(3, 32, 32))
def preact_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Pre-activation ResNet-18 (BackdoorBench's reference model)."""
    return CifarResNet((2, 2, 2, 2), num_classes, in_channels, preact=True)


def _torchvision_factory(tv_name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    import torchvision

    # weights=None: harden never downloads weights; pretrained weights arrive through MLflow.
    return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)


_TORCHVISION_CLASSIFIERS = (
    "resnet18", "resnet34", "resnet50", "wide_resnet50_2", "vgg11_bn", "vgg16_bn",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
    "densenet121", "convnext_tiny", "shufflenet_v2_x1_0", "regnet_y_400mf", "vit_b_16",
)

for _tv_name in _TORCHVISION_CLASSIFIERS:
    register_arch(f"torchvision/{_tv_name}", default_input=(3, 224, 224), description=f"torchvision {_tv_name}")(
        functools.partial(_torchvision_factory, _tv_name)
    )
