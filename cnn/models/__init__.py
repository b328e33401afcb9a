"""Model architectures and the containers they are built from.

``build(name, num_classes=None, seed=0)`` is the one entry point:

=============  ===========  =======  =============  ==========================================
name           input        classes  parameters     notes
=============  ===========  =======  =============  ==========================================
digits         1 x 8 x 8    10       9,930          embedded digits data; end-to-end tests
lenet          1 x 28 x 28  10       61,706         LeNet-5 shape, ReLU + max pool
lenet-cifar    3 x 32 x 32  10       62,006         LeNet-5, unpadded; ensemble benchmark
resnet20       3 x 32 x 32  10       272,474        CIFAR ResNet, option-B projections
vgg16-cifar    3 x 32 x 32  10       14,982,474     13 VGG-16 convs, FC 512-512-C, no BN
vgga           3 x 224^2    1000     132,863,336    torchvision ``vgg11``
vgg16          3 x 224^2    1000     138,357,544    torchvision ``vgg16``
resnet50       3 x 224^2    1000     25,557,032     torchvision ``resnet50`` (v1.5)
=============  ===========  =======  =============  ==========================================

The interface the distributed engine relies on is `Model`'s
(docs/cnn_contract.md).
"""

from collections import namedtuple

import numpy as np

from .adaptive_pool import AdaptiveAvgPool2d
from .containers import BasicBlock, Bottleneck, Container, Sequential
from .model import HookHandle, Model, StateDictError
from .resnet import resnet20, resnet50
from .small import digits, lenet, lenet_cifar
from .vgg import vgg16, vgg16_cifar, vgga

__all__ = [
    "MODELS",
    "AdaptiveAvgPool2d",
    "BasicBlock",
    "Bottleneck",
    "Container",
    "HookHandle",
    "Model",
    "ModelSpec",
    "Sequential",
    "StateDictError",
    "build",
]

ModelSpec = namedtuple("ModelSpec", ["constructor", "num_classes", "input_shape"])

#: name -> ModelSpec(constructor, default number of classes, input shape (C, H, W))
MODELS = {
    "digits": ModelSpec(digits, 10, (1, 8, 8)),
    "lenet": ModelSpec(lenet, 10, (1, 28, 28)),
    "lenet-cifar": ModelSpec(lenet_cifar, 10, (3, 32, 32)),
    "resnet20": ModelSpec(resnet20, 10, (3, 32, 32)),
    "vgg16-cifar": ModelSpec(vgg16_cifar, 10, (3, 32, 32)),
    "vgga": ModelSpec(vgga, 1000, (3, 224, 224)),
    "vgg16": ModelSpec(vgg16, 1000, (3, 224, 224)),
    "resnet50": ModelSpec(resnet50, 1000, (3, 224, 224)),
}


def build(name, num_classes=None, seed=0):
    """Build a model by name with a deterministic initialisation.

    Parameters
    ----------
    name : str
        One of `MODELS` (see the table in this module's docstring).
    num_classes : int, optional
        Size of the output layer; the architecture's default if None.
    seed : int
        Seeds the one ``numpy.random.Generator`` every layer draws its initial
        weights from, in forward order: same seed, same weights, bit for bit.

    Returns
    -------
    Model
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    spec = MODELS[name]
    num_classes = spec.num_classes if num_classes is None else int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = spec.constructor(num_classes=num_classes, rng=np.random.default_rng(seed))
    assert model.input_shape == spec.input_shape, (name, model.input_shape)
    return model
