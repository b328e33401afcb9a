"""Small networks: LeNet-5 for 1 x 28 x 28 and 3 x 32 x 32 images, a tiny CNN for 8 x 8 digits.

``lenet`` keeps LeNet-5's shape (LeCun et al. 1998): conv 5x5 -> 6 maps, pool,
conv 5x5 -> 16 maps, pool, FC 400 -> 120 -> 84 -> 10. The first conv pads by
2 so a 28 x 28 MNIST image plays the paper's 32 x 32 input. Modern choices
inside that shape: ReLU instead of scaled tanh, 2x2 max pooling instead of
trainable subsampling, a full C3 connection table, a plain linear output
instead of RBF units. 61,706 parameters; no BatchNorm, no dropout.

``lenet_cifar`` is the same network on CIFAR-shaped 3 x 32 x 32 input, the
paper's layout exactly (no padding, 32 -> 28 -> 14 -> 10 -> 5): 62,006
parameters. It is the cheap member model of the ensemble benchmark: its
training costs a few times the CPU per image of the data pipeline feeding
it, where resnet20's costs ~100 times.

``digits`` is sized for the embedded 8 x 8 digits data set (1,797 images): it
trains to >= 95 % held-out accuracy in a few seconds on one core and is the
model of the end-to-end tests.
"""

from cnn.layers import Conv2D, Flatten, Linear, MaxPool2D, ReLU

from .model import Model


def _lenet5(name, input_shape, padding, num_classes, rng):
    """The LeNet-5 layers after a first conv that sees `input_shape` with `padding`."""
    return Model(
        name, input_shape, num_classes,
        ("conv1", Conv2D(input_shape[0], 6, 5, padding=padding, rng=rng)),
        ("relu1", ReLU()),
        ("pool1", MaxPool2D(2)),
        ("conv2", Conv2D(6, 16, 5, rng=rng)),
        ("relu2", ReLU()),
        ("pool2", MaxPool2D(2)),
        ("flatten", Flatten()),
        ("fc1", Linear(16 * 5 * 5, 120, rng=rng)),
        ("relu3", ReLU()),
        ("fc2", Linear(120, 84, rng=rng)),
        ("relu4", ReLU()),
        ("fc3", Linear(84, num_classes, rng=rng)),
    )


def lenet(num_classes=10, rng=None):
    """LeNet-5 shape on 1 x 28 x 28: feature maps 6 x 28^2, 6 x 14^2, 16 x 10^2, 16 x 5^2."""
    return _lenet5("lenet", (1, 28, 28), 2, num_classes, rng)


def lenet_cifar(num_classes=10, rng=None):
    """LeNet-5 on 3 x 32 x 32: feature maps 6 x 28^2, 6 x 14^2, 16 x 10^2, 16 x 5^2."""
    return _lenet5("lenet-cifar", (3, 32, 32), 0, num_classes, rng)


def digits(num_classes=10, rng=None):
    """1 x 8 x 8 -> conv 3x3 16 -> ReLU -> max pool 2 -> conv 3x3 32 -> ReLU -> FC 512 -> 10.

    9,930 parameters for 10 classes.
    """
    return Model(
        "digits", (1, 8, 8), num_classes,
        ("conv1", Conv2D(1, 16, 3, padding=1, rng=rng)),
        ("relu1", ReLU()),
        ("pool1", MaxPool2D(2)),
        ("conv2", Conv2D(16, 32, 3, padding=1, rng=rng)),
        ("relu2", ReLU()),
        ("flatten", Flatten()),
        ("fc", Linear(32 * 4 * 4, num_classes, rng=rng)),
    )
