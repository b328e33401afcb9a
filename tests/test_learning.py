"""End to end: the `digits` model learns the embedded digits with SGD.

The whole stack at once - layers, model, loss, optimizer, data - on a real data
set: 1,442 training images, accuracy measured on the 355 held out. Takes a few
seconds on 2 cores (the budget asserted below is a minute).
"""

import time

import numpy as np

from cnn import models
from cnn.data import load_digits
from cnn.losses import SoftmaxCrossEntropy
from cnn.optim import SGD

EPOCHS = 6
BATCH = 32
LR = 0.05  # divided by 10 for the last two epochs


def _accuracy(model, x, y):
    return float(np.mean(model.forward(x, train=False).argmax(axis=1) == y))


def test_digits_model_reaches_95_percent():
    start = time.perf_counter()
    x, y = load_digits("train", standardize=True)
    x_test, y_test = load_digits("test", standardize=True)
    model = models.build("digits", seed=0)
    optimizer = SGD(model.parameters(), lr=LR, momentum=0.9)
    loss = SoftmaxCrossEntropy()
    rng = np.random.default_rng(0)
    chance = _accuracy(model, x_test, y_test)
    losses = []
    for epoch in range(EPOCHS):
        optimizer.lr = LR if epoch < EPOCHS - 2 else LR / 10
        order = rng.permutation(len(x))
        for begin in range(0, len(x), BATCH):
            batch = order[begin:begin + BATCH]
            optimizer.zero_grad()
            losses.append(loss.forward(model.forward(x[batch]), y[batch]))
            model.backward(loss.backward())
            optimizer.step()
    accuracy = _accuracy(model, x_test, y_test)
    elapsed = time.perf_counter() - start
    assert chance < 0.3
    assert np.mean(losses[-20:]) < 0.2 * np.mean(losses[:20])
    assert accuracy >= 0.95, f"held-out accuracy {accuracy:.3f} after {EPOCHS} epochs"
    # generous: the point is "a few seconds", on a loaded 2-core CI machine too
    assert elapsed < 300, f"training took {elapsed:.1f} s"
