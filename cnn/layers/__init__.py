"""Leaf layers: forward(x, train=True) -> y, backward(dy) -> dx, .params.

Each numba kernel has a plain-numpy reference beside it (``*_reference``): the
teaching version and the test oracle. Setting ``layer.reference = True`` routes a
layer through its references.
"""

from .activation import ReLU
from .base import Layer, Parameter
from .batchnorm import BatchNorm2d
from .conv import Conv2D
from .dropout import Dropout
from .flatten import Flatten
from .linear import Linear
from .pool import AvgPool2D, GlobalAvgPool2D, MaxPool2D

__all__ = [
    "AvgPool2D",
    "BatchNorm2d",
    "Conv2D",
    "Dropout",
    "Flatten",
    "GlobalAvgPool2D",
    "Layer",
    "Linear",
    "MaxPool2D",
    "Parameter",
    "ReLU",
]
