"""VGG (Simonyan & Zisserman 2015): stacks of 3x3 conv + ReLU separated by 2x2 max pools.

Configurations list conv output channels, ``"M"`` for a max pool. The layer
indices inside ``features`` and ``classifier`` are torchvision's, so the
state_dict keys are too (``features.0.weight`` ... ``classifier.6.bias``).

=============  ===========  ================================================  ===========
name           input        head                                              parameters
=============  ===========  ================================================  ===========
vgga           3 x 224^2    avgpool 7x7, 25088-4096-4096-C, dropout 0.5       132,863,336
vgg16          3 x 224^2    avgpool 7x7, 25088-4096-4096-C, dropout 0.5       138,357,544
vgg16-cifar    3 x 32^2     512-512-C (1 x 1 feature map after 5 pools)        14,982,474
=============  ===========  ================================================  ===========

(parameter counts for C = 1000, 1000 and 10 classes). ``vgga`` is
configuration A of the paper, torchvision's ``vgg11``. No BatchNorm anywhere.
"""

from cnn.layers import Conv2D, Dropout, Flatten, Linear, MaxPool2D, ReLU

from .adaptive_pool import AdaptiveAvgPool2d
from .containers import Sequential
from .model import Model

CONFIGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def make_features(config, in_channels, rng):
    """Conv 3x3 (padding 1: size kept) + ReLU per entry, MaxPool2D(2, 2) per ``"M"``.

    The ReLUs are in place, as torchvision's: a Conv2D (or Linear) keeps its
    input, not its output, so the ReLU may overwrite it.
    """
    layers = []
    for entry in config:
        if entry == "M":
            layers.append(MaxPool2D(2, stride=2))
        else:
            layers.append(Conv2D(in_channels, entry, 3, padding=1, rng=rng))
            layers.append(ReLU(inplace=True))
            in_channels = entry
    return Sequential(*layers)


def _imagenet_vgg(name, config, num_classes, rng):
    """torchvision's VGG: features, AdaptiveAvgPool2d((7, 7)), classifier with Dropout."""
    classifier = Sequential(
        Linear(512 * 7 * 7, 4096, rng=rng),
        ReLU(inplace=True),
        Dropout(0.5, rng=rng),
        Linear(4096, 4096, rng=rng),
        ReLU(inplace=True),
        Dropout(0.5, rng=rng),
        Linear(4096, num_classes, rng=rng),
    )
    return Model(
        name, (3, 224, 224), num_classes,
        ("features", make_features(CONFIGS[config], 3, rng)),
        ("avgpool", AdaptiveAvgPool2d((7, 7))),
        ("flatten", Flatten()),
        ("classifier", classifier),
    )


def vgg16(num_classes=1000, rng=None):
    """torchvision ``vgg16``: 13 conv + 3 FC layers, 3 x 224 x 224 input."""
    return _imagenet_vgg("vgg16", "D", num_classes, rng)


def vgga(num_classes=1000, rng=None):
    """VGG configuration A (torchvision ``vgg11``): 8 conv + 3 FC layers."""
    return _imagenet_vgg("vgga", "A", num_classes, rng)


def vgg16_cifar(num_classes=10, rng=None):
    """The 13 conv layers of VGG-16 on 3 x 32 x 32, then 512 -> 512 -> classes.

    After five 2x2 pools the feature map is 512 x 1 x 1, so no adaptive pool.
    Plain conv + ReLU (no BatchNorm) and no dropout; the 3 x 3 convolutions carry
    about 98 % of the parameters and of the FLOPs.
    """
    classifier = Sequential(
        Linear(512, 512, rng=rng),
        ReLU(inplace=True),
        Linear(512, num_classes, rng=rng),
    )
    return Model(
        "vgg16-cifar", (3, 32, 32), num_classes,
        ("features", make_features(CONFIGS["D"], 3, rng)),
        ("flatten", Flatten()),
        ("classifier", classifier),
    )
