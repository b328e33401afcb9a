"""Losses: values against direct formulas, gradients against finite differences."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnn.losses import MSELoss, SoftmaxCrossEntropy


def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(2, 7), seed=st.integers(0, 2**32 - 1))
def test_softmax_cross_entropy(n, k, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, k)) * 3).astype(np.float32)
    labels = rng.integers(0, k, n)
    loss = SoftmaxCrossEntropy()
    value = loss.forward(logits, labels)
    z = logits.astype(np.float64)
    expected = -log_softmax(z)[np.arange(n), labels].mean()
    assert isinstance(value, float)
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-7)  # float32 log-sum-exp
    grad = loss.backward()
    assert grad.dtype == np.float32 and grad.shape == (n, k)
    # central differences of the float64 formula
    eps = 1e-6
    for i in range(n):
        for j in range(k):
            up, down = z.copy(), z.copy()
            up[i, j] += eps
            down[i, j] -= eps
            numeric = (-log_softmax(up)[np.arange(n), labels].mean()
                       + log_softmax(down)[np.arange(n), labels].mean()) / (2 * eps)
            np.testing.assert_allclose(grad[i, j], numeric, rtol=1e-4, atol=1e-6)


def test_softmax_cross_entropy_is_stable_for_large_logits():
    loss = SoftmaxCrossEntropy()
    logits = np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32)
    assert loss.forward(logits, np.array([0])) == pytest.approx(0.0, abs=1e-6)
    assert loss.forward(logits, np.array([1])) == pytest.approx(1000.0, rel=1e-6)
    assert np.isfinite(loss.backward()).all()


@pytest.mark.parametrize("logits, labels, message", [
    (np.zeros((2, 3), np.float64), np.array([0, 1]), "float32"),
    (np.zeros(3, np.float32), np.array([0]), r"\(N, K\)"),
    (np.zeros((2, 3), np.float32), np.array([0, 3]), r"\[0, 3\)"),
    (np.zeros((2, 3), np.float32), np.array([0]), "labels"),
    (np.zeros((2, 3), np.float32), np.array([0.0, 1.0]), "integer"),
])
def test_softmax_cross_entropy_bad_input(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        SoftmaxCrossEntropy().forward(logits, labels)


def test_backward_before_forward():
    with pytest.raises(RuntimeError):
        SoftmaxCrossEntropy().backward()
    with pytest.raises(RuntimeError):
        MSELoss().backward()


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 2**32 - 1))
def test_mse(shape, seed):
    rng = np.random.default_rng(seed)
    prediction = rng.standard_normal(shape).astype(np.float32)
    target = rng.standard_normal(shape).astype(np.float32)
    loss = MSELoss()
    diff = prediction.astype(np.float64) - target
    np.testing.assert_allclose(loss.forward(prediction, target), np.mean(diff**2), rtol=1e-6)
    grad = loss.backward()
    assert grad.dtype == np.float32
    np.testing.assert_allclose(grad, 2 * diff / diff.size, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError):
        loss.forward(prediction, target.reshape(-1)[:-1] if target.size > 1 else target[None])
