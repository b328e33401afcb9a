"""Residual networks (He et al. 2016) with torchvision's names.

``resnet20`` - the CIFAR network of the paper's section 4.2: a 3x3 conv with 16
channels, then 3 stages of 3 `BasicBlock` with 16, 32, 64 channels (stride 2 at
the start of stages 2 and 3), global average pooling and one FC layer; 6n + 2 =
20 weighted layers for n = 3.

Shortcut choice: the paper's CIFAR experiments use option A (identity with zero
padded extra channels, parameter-free). We use option B, a projection (1x1 conv
+ BN) exactly where the shape changes, for three reasons: it is what torchvision
and most data-parallel benchmarks use, every layer then is an ordinary
conv/BN with torchvision names (``layer2.0.downsample.0.weight``), and there is
no strided-slice/zero-pad special case in backward. Cost: 2,752 extra
parameters (272,474 instead of 269,722 for 10 classes, still "0.27 M").

``resnet50`` - torchvision's ``resnet50``: 7x7/2 conv, 3x3/2 max pool, 3-4-6-3
`Bottleneck` blocks (v1.5: stride on the 3x3 conv), global average pooling,
FC 2048 -> 1000; 25,557,032 parameters.
"""

from cnn.layers import (
    BatchNorm2d,
    Conv2D,
    Flatten,
    GlobalAvgPool2D,
    Linear,
    MaxPool2D,
)

from .containers import BasicBlock, Bottleneck, Sequential
from .model import Model


def make_stage(block, in_channels, channels, blocks, stride, rng):
    """``blocks`` residual blocks; only the first one strides (and may project)."""
    layers = [block(in_channels, channels, stride=stride, rng=rng)]
    for _ in range(1, blocks):
        layers.append(block(channels * block.expansion, channels, stride=1, rng=rng))
    return Sequential(*layers)


def resnet20(num_classes=10, rng=None):
    """CIFAR ResNet-20 on 3 x 32 x 32 (feature maps 32^2, 16^2, 8^2)."""
    return Model(
        "resnet20", (3, 32, 32), num_classes,
        ("conv1", Conv2D(3, 16, 3, padding=1, bias=False, rng=rng)),
        ("bn1", BatchNorm2d(16, relu=True)),
        ("layer1", make_stage(BasicBlock, 16, 16, 3, 1, rng)),
        ("layer2", make_stage(BasicBlock, 16, 32, 3, 2, rng)),
        ("layer3", make_stage(BasicBlock, 32, 64, 3, 2, rng)),
        ("avgpool", GlobalAvgPool2D()),
        ("flatten", Flatten()),
        ("fc", Linear(64, num_classes, rng=rng)),
    )


def resnet50(num_classes=1000, rng=None):
    """torchvision ResNet-50 (v1.5) on 3 x 224 x 224 (feature maps 56^2 ... 7^2)."""
    return Model(
        "resnet50", (3, 224, 224), num_classes,
        ("conv1", Conv2D(3, 64, 7, stride=2, padding=3, bias=False, rng=rng)),
        ("bn1", BatchNorm2d(64, relu=True)),
        ("maxpool", MaxPool2D(3, stride=2, padding=1)),
        ("layer1", make_stage(Bottleneck, 64, 64, 3, 1, rng)),
        ("layer2", make_stage(Bottleneck, 256, 128, 4, 2, rng)),
        ("layer3", make_stage(Bottleneck, 512, 256, 6, 2, rng)),
        ("layer4", make_stage(Bottleneck, 1024, 512, 3, 2, rng)),
        ("avgpool", GlobalAvgPool2D()),
        ("flatten", Flatten()),
        ("fc", Linear(2048, num_classes, rng=rng)),
    )
