"""Leaf layers: numba vs numpy reference, references vs finite differences.

Each comparison body runs against both implementations (``impl``): the layer
in float32 must match the float64 numpy reference. The float64 references are
checked against central finite differences, so the chain is

    numba kernel == numpy reference (float32)   and   reference == d/dx (float64).
"""

import contextlib

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cnn
from cnn.layers import (
    AvgPool2D,
    BatchNorm2d,
    Conv2D,
    Dropout,
    Flatten,
    GlobalAvgPool2D,
    Linear,
    MaxPool2D,
    Parameter,
    ReLU,
)
from cnn.layers.activation import add_into, relu_backward_reference, relu_forward_reference
from cnn.layers.batchnorm import (
    batch_statistics_reference,
    batchnorm2d_backward_reference,
    batchnorm2d_forward_reference,
)
from cnn.layers.conv import conv2d_backward_reference, conv2d_forward_reference
from cnn.layers.linear import linear_backward_reference, linear_forward_reference
from cnn.layers.pool import (
    avgpool2d_backward_reference,
    avgpool2d_forward_reference,
    maxpool2d_backward_reference,
    maxpool2d_forward_reference,
)

IMPLS = ["numba", "reference"]
FAST = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def numerical_grad_check(loss, arrays_and_grads, rng, points=12, eps=1e-6):
    """Compare analytic gradients with central differences of `loss()` (float64).

    arrays_and_grads: (array, analytic gradient) pairs; `loss` reads the arrays,
    which are perturbed in place at a few random positions.
    """
    for array, grad in arrays_and_grads:
        flat = array.reshape(-1)
        for k in rng.choice(flat.size, size=min(points, flat.size), replace=False):
            old = flat[k]
            flat[k] = old + eps
            up = loss()
            flat[k] = old - eps
            down = loss()
            flat[k] = old
            numeric = (up - down) / (2 * eps)
            np.testing.assert_allclose(grad.reshape(-1)[k], numeric, rtol=1e-5, atol=1e-7)


@contextlib.contextmanager
def patched(module, **values):
    """Set module-level tuning constants for the block, restore them after."""
    old = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


def make_layer(layer, impl):
    layer.reference = impl == "reference"
    return layer


def close32(actual, expected):
    """float32 result vs float64 oracle."""
    assert actual.dtype == np.float32
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale)


@st.composite
def windows(draw, pool=False):
    """A sliding-window geometry and an input shape with at least one output."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if pool:
        ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    else:
        ph, pw = draw(st.integers(0, kh)), draw(st.integers(0, kw))
    height = draw(st.integers(max(1, kh - 2 * ph), max(1, kh - 2 * ph) + 6))
    width = draw(st.integers(max(1, kw - 2 * pw), max(1, kw - 2 * pw) + 6))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return (n, c, height, width), (kh, kw), (sh, sw), (ph, pw)


seeds = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------------------
# Conv2D
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@FAST
@given(geometry=windows(), out_channels=st.integers(1, 4), bias=st.booleans(), seed=seeds)
def test_conv2d_matches_reference(impl, geometry, out_channels, bias, seed):
    shape, kernel, stride, padding = geometry
    rng = np.random.default_rng(seed)
    layer = make_layer(Conv2D(shape[1], out_channels, kernel, stride, padding, bias=bias,
                              rng=rng), impl)
    x = rng.standard_normal(shape).astype(np.float32)
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(dy)

    w64 = layer.weight.data.astype(np.float64)
    b64 = layer.bias.data.astype(np.float64) if bias else None
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    close32(y, conv2d_forward_reference(x64, w64, b64, stride, padding))
    dx_ref, dw_ref, db_ref = conv2d_backward_reference(dy64, x64, w64, stride, padding)
    close32(dx, dx_ref)
    close32(layer.weight.grad, dw_ref)
    if bias:
        close32(layer.bias.grad, db_ref)


@FAST
@given(geometry=windows(), out_channels=st.integers(1, 3), seed=seeds)
def test_conv2d_reference_gradients(geometry, out_channels, seed):
    shape, kernel, stride, padding = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((out_channels, shape[1]) + kernel)
    b = rng.standard_normal(out_channels)
    y = conv2d_forward_reference(x, w, b, stride, padding)
    g = rng.standard_normal(y.shape)
    dx, dw, db = conv2d_backward_reference(g, x, w, stride, padding)
    assert y.shape[2] == (shape[2] + 2 * padding[0] - kernel[0]) // stride[0] + 1
    numerical_grad_check(lambda: np.sum(conv2d_forward_reference(x, w, b, stride, padding) * g),
                         [(x, dx), (w, dw), (b, db)], rng)


def test_conv2d_init_and_layouts():
    layer = Conv2D(3, 8, 3, padding=1, rng=np.random.default_rng(0))
    assert layer.weight.data.shape == (8, 3, 3, 3) and layer.bias.data.shape == (8,)
    assert layer.weight.data.dtype == np.float32 and layer.weight.data.flags.c_contiguous
    assert [p.name for p in layer.params] == ["weight", "bias"]
    assert abs(layer.weight.data.std() - np.sqrt(2.0 / (8 * 9))) < 0.05
    assert not Conv2D(3, 8, 3, bias=False).params[1:]


def test_conv2d_skip_input_grad_and_large_batch_chunks():
    rng = np.random.default_rng(1)
    layer = Conv2D(4, 5, 3, stride=1, padding=1, rng=rng)
    x = rng.standard_normal((70, 4, 6, 6)).astype(np.float32)  # several batch chunks
    import cnn.layers.conv as conv_module

    with patched(conv_module, CHUNK_ELEMENTS=36 * 36 * 8):  # force ~8 samples per chunk
        y = layer.forward(x)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx = layer.backward(dy)
        dw = layer.weight.grad.copy()
        layer.zero_grad()
        layer.skip_input_grad = True
        assert layer.backward(dy) is None
        np.testing.assert_allclose(layer.weight.grad, dw, rtol=1e-6)
    dx_ref, dw_ref, _ = conv2d_backward_reference(
        dy.astype(np.float64), x.astype(np.float64), layer.weight.data.astype(np.float64),
        (1, 1), (1, 1))
    close32(dx, dx_ref)
    close32(dw, dw_ref)


# ---------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["max", "avg"])
@FAST
@given(geometry=windows(pool=True), seed=seeds)
def test_pool2d_matches_reference(impl, kind, geometry, seed):
    shape, kernel, stride, padding = geometry
    rng = np.random.default_rng(seed)
    cls = MaxPool2D if kind == "max" else AvgPool2D
    layer = make_layer(cls(kernel, stride, padding), impl)
    x = rng.standard_normal(shape).astype(np.float32)
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(dy)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    if kind == "max":
        y_ref, argmax = maxpool2d_forward_reference(x64, kernel, stride, padding)
        dx_ref = maxpool2d_backward_reference(dy64, argmax, shape, kernel, stride, padding)
    else:
        y_ref = avgpool2d_forward_reference(x64, kernel, stride, padding)
        dx_ref = avgpool2d_backward_reference(dy64, shape, kernel, stride, padding)
    close32(y, y_ref)
    close32(dx, dx_ref)


@pytest.mark.parametrize("kind", ["max", "avg"])
@FAST
@given(geometry=windows(pool=True), seed=seeds)
def test_pool2d_reference_gradients(kind, geometry, seed):
    shape, kernel, stride, padding = geometry
    rng = np.random.default_rng(seed)
    x = rng.permutation(np.arange(np.prod(shape), dtype=np.float64)).reshape(shape) * 0.1
    if kind == "max":  # distinct values 0.1 apart: no ties within eps
        y, argmax = maxpool2d_forward_reference(x, kernel, stride, padding)
        g = rng.standard_normal(y.shape)
        dx = maxpool2d_backward_reference(g, argmax, shape, kernel, stride, padding)

        def loss():
            return np.sum(maxpool2d_forward_reference(x, kernel, stride, padding)[0] * g)
    else:
        y = avgpool2d_forward_reference(x, kernel, stride, padding)
        g = rng.standard_normal(y.shape)
        dx = avgpool2d_backward_reference(g, shape, kernel, stride, padding)

        def loss():
            return np.sum(avgpool2d_forward_reference(x, kernel, stride, padding) * g)
    numerical_grad_check(loss, [(x, dx)], rng)


def test_avgpool_counts_padding_in_divisor():
    x = np.ones((1, 1, 2, 2), dtype=np.float32)
    for impl in IMPLS:
        y = make_layer(AvgPool2D(3, stride=1, padding=1), impl).forward(x)
        np.testing.assert_allclose(y[0, 0], np.full((2, 2), 4 / 9), rtol=1e-6)


def test_maxpool_default_stride_and_padding_is_minus_infinity():
    x = -np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4) - 1.0
    for impl in IMPLS:
        y = make_layer(MaxPool2D(2), impl).forward(x)
        np.testing.assert_array_equal(y[0, 0], [[-1, -3], [-9, -11]])
        y = make_layer(MaxPool2D(3, stride=2, padding=1), impl).forward(x)
        np.testing.assert_array_equal(y[0, 0], [[-1, -2], [-5, -6]])


@pytest.mark.parametrize("seed", [0, 1])
def test_global_avg_pool(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    layer = GlobalAvgPool2D()
    y = layer.forward(x)
    assert y.shape == (3, 4, 1, 1)
    close32(y, x.astype(np.float64).mean(axis=(2, 3), keepdims=True))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    close32(layer.backward(dy), np.broadcast_to(dy / 30.0, x.shape))


# ---------------------------------------------------------------------------
# BatchNorm2d
# ---------------------------------------------------------------------------

bn_shapes = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5),
                      st.integers(1, 5)).filter(lambda s: s[0] * s[2] * s[3] > 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@FAST
@given(shape=bn_shapes, seed=seeds)
def test_batchnorm_matches_reference(impl, train, relu, shape, seed):
    """BatchNorm2d (with its fused ReLU when relu) against the float64 references:
    batch norm, then relu_forward_reference; backward masks dy with the output."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    layer = make_layer(BatchNorm2d(c, relu=relu), impl)
    layer.weight.data[...] = rng.standard_normal(c)
    layer.bias.data[...] = rng.standard_normal(c)
    layer.running_mean[...] = rng.standard_normal(c)
    layer.running_var[...] = rng.uniform(0.5, 2.0, c)
    running_mean, running_var = layer.running_mean.copy(), layer.running_var.copy()
    x = (rng.standard_normal(shape) * 3 + 5).astype(np.float32)
    y = layer.forward(x, train=train)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx = layer.backward(dy)

    x64 = x.astype(np.float64)
    if train:
        mean, var = batch_statistics_reference(x64)
        m = x.size // c
        close32(layer.running_mean, 0.9 * running_mean + 0.1 * mean)
        close32(layer.running_var, 0.9 * running_var + 0.1 * var * m / (m - 1))
        assert int(layer.num_batches_tracked) == 1
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
        np.testing.assert_array_equal(layer.running_mean, running_mean)
        assert int(layer.num_batches_tracked) == 0
    gamma = layer.weight.data.astype(np.float64)
    y_ref = batchnorm2d_forward_reference(x64, gamma, layer.bias.data.astype(np.float64),
                                          mean, var, 1e-5)
    dy64 = dy.astype(np.float64)
    if relu:
        y_ref = relu_forward_reference(y_ref)
        # the mask comes from the layer's own float32 output (a value rounding to
        # exactly 0 in float32 but not in float64 would otherwise disagree)
        dy64 = relu_backward_reference(dy64, y)
        assert (y >= 0).all()
    close32(y, y_ref)
    dx_ref, dgamma, dbeta = batchnorm2d_backward_reference(dy64, x64, gamma, mean, var, 1e-5, train)
    close32(dx, dx_ref)
    close32(layer.weight.grad, dgamma)
    close32(layer.bias.grad, dbeta)


@pytest.mark.parametrize("train", [True, False])
@FAST
@given(shape=bn_shapes, seed=seeds)
def test_batchnorm_reference_gradients(train, shape, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    running = (rng.standard_normal(c), rng.uniform(0.5, 2.0, c))
    g = rng.standard_normal(shape)

    def stats():
        return batch_statistics_reference(x) if train else running

    def loss():
        return np.sum(batchnorm2d_forward_reference(x, gamma, beta, *stats(), 1e-5) * g)

    dx, dgamma, dbeta = batchnorm2d_backward_reference(g, x, gamma, *stats(), 1e-5, train)
    numerical_grad_check(loss, [(x, dx), (gamma, dgamma), (beta, dbeta)], rng)


def test_batchnorm_train_output_is_normalised_and_eval_uses_running_stats():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 3, 4, 4)) * 2 + 7).astype(np.float32)
    for impl in IMPLS:
        layer = make_layer(BatchNorm2d(3, momentum=1.0), impl)
        y = layer.forward(x, train=True)
        np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)
        np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, rtol=1e-3)
        # momentum 1: the running statistics are the batch ones (var unbiased)
        np.testing.assert_allclose(layer.running_var, x.var(axis=(0, 2, 3), ddof=1), rtol=1e-5)
        y_eval = layer.forward(x, train=False)
        expected = (x - layer.running_mean[None, :, None, None]) / np.sqrt(
            layer.running_var[None, :, None, None] + 1e-5)
        np.testing.assert_allclose(y_eval, expected, rtol=1e-4, atol=1e-5)
        assert int(layer.num_batches_tracked) == 1


# ---------------------------------------------------------------------------
# ReLU, Linear, Flatten, Dropout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@FAST
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=seeds)
def test_relu_matches_reference(impl, shape, seed):
    rng = np.random.default_rng(seed)
    layer = make_layer(ReLU(), impl)
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[0] = 0.0  # the kink: gradient 0 there, as torch
    y = layer.forward(x)
    dy = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(y, relu_forward_reference(x))
    np.testing.assert_array_equal(layer.backward(dy), relu_backward_reference(dy, y))
    assert layer.backward(dy).reshape(-1)[0] == 0.0


@pytest.mark.parametrize("impl", IMPLS)
@FAST
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=seeds)
def test_relu_residual_and_inplace(impl, shape, seed):
    """forward(x, residual=r) is max(x + r, 0); inplace writes it over x."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    r = rng.standard_normal(shape).astype(np.float32)
    expected = relu_forward_reference(x + r)
    y = make_layer(ReLU(), impl).forward(x.copy(), residual=r)
    np.testing.assert_array_equal(y, expected)
    layer = make_layer(ReLU(inplace=True), impl)
    x_in = x.copy()
    y = layer.forward(x_in, residual=r)
    assert np.shares_memory(y, x_in)
    np.testing.assert_array_equal(x_in, expected)
    dy = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(layer.backward(dy), relu_backward_reference(dy, expected))
    x_in = x.copy()
    np.testing.assert_array_equal(layer.forward(x_in), relu_forward_reference(x))
    np.testing.assert_array_equal(x_in, relu_forward_reference(x))


def test_relu_residual_and_inplace_errors():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="residual must match the input shape"):
        ReLU().forward(x, residual=np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="float32 residual"):
        ReLU().forward(x, residual=np.ones((2, 3)))
    x.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ReLU(inplace=True).forward(x)


@FAST
@given(size=st.integers(1, 40000), seed=seeds)
def test_add_into(size, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(size).astype(np.float32)
    b = rng.standard_normal(size).astype(np.float32)
    expected = a + b
    add_into(a, b)
    np.testing.assert_array_equal(a, expected)


def test_relu_reference_gradient():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7))
    g = rng.standard_normal(x.shape)
    dx = relu_backward_reference(g, relu_forward_reference(x))
    numerical_grad_check(lambda: np.sum(relu_forward_reference(x) * g), [(x, dx)], rng)


@FAST
@given(n=st.integers(1, 5), fan_in=st.integers(1, 6), fan_out=st.integers(1, 6), seed=seeds)
def test_linear(n, fan_in, fan_out, seed):
    rng = np.random.default_rng(seed)
    layer = Linear(fan_in, fan_out, rng=rng)
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(layer.weight.data).max() <= bound and layer.weight.data.shape == (fan_out, fan_in)
    x = rng.standard_normal((n, fan_in)).astype(np.float32)
    y = layer.forward(x)
    assert layer.input is x or np.array_equal(layer.input, x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(dy)
    w64, x64, dy64 = (a.astype(np.float64) for a in (layer.weight.data, x, dy))
    close32(y, linear_forward_reference(x64, w64, layer.bias.data.astype(np.float64)))
    dx_ref, dw_ref, db_ref = linear_backward_reference(dy64, x64, w64)
    close32(dx, dx_ref)
    close32(layer.weight.grad, dw_ref)
    close32(layer.bias.grad, db_ref)
    # reference vs finite differences
    b64 = layer.bias.data.astype(np.float64)
    numerical_grad_check(lambda: np.sum(linear_forward_reference(x64, w64, b64) * dy64),
                         [(x64, dx_ref), (w64, dw_ref), (b64, db_ref)], rng)


def test_linear_skip_weight_grad():
    rng = np.random.default_rng(0)
    layer = Linear(4, 3, rng=rng)
    layer.skip_weight_grad = True
    x = rng.standard_normal((5, 4)).astype(np.float32)
    dy = rng.standard_normal((5, 3)).astype(np.float32)
    layer.forward(x)
    dx = layer.backward(dy)
    assert not layer.weight.grad.any()
    close32(layer.bias.grad, dy.astype(np.float64).sum(axis=0))
    close32(dx, dy.astype(np.float64) @ layer.weight.data)
    np.testing.assert_array_equal(layer.input, x)


def test_flatten_roundtrip():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    layer = Flatten()
    y = layer.forward(x)
    assert y.shape == (2, 12)
    np.testing.assert_array_equal(layer.backward(y), x)


def test_dropout():
    rng = np.random.default_rng(0)
    x = np.ones((200, 50), dtype=np.float32)
    layer = Dropout(0.25, rng=rng)
    y = layer.forward(x, train=True)
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / 0.75)
    assert abs(kept.mean() - 0.75) < 0.02
    dy = np.full_like(x, 2.0)
    np.testing.assert_array_equal(layer.backward(dy), np.where(kept, 2 / 0.75, 0).astype(np.float32))
    np.testing.assert_array_equal(layer.forward(x, train=False), x)
    np.testing.assert_array_equal(layer.backward(dy), dy)
    assert not Dropout(1.0).forward(x).any()
    np.testing.assert_array_equal(Dropout(0.0).forward(x), x)
    with pytest.raises(ValueError):
        Dropout(1.5)


# ---------------------------------------------------------------------------
# the contract: accumulation, no rebinding, zero_grad
# ---------------------------------------------------------------------------


def _all_param_layers():
    rng = np.random.default_rng(0)
    return [
        (Conv2D(2, 3, 3, padding=1, rng=rng), (2, 2, 5, 5)),
        (BatchNorm2d(2), (2, 2, 5, 5)),
        (Linear(4, 3, rng=rng), (2, 4)),
    ]


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_accumulates_and_never_rebinds(impl):
    rng = np.random.default_rng(0)
    for layer, shape in _all_param_layers():
        make_layer(layer, impl)
        ids = [(id(p.data), id(p.grad)) for p in layer.params]
        x = rng.standard_normal(shape).astype(np.float32)
        y = layer.forward(x)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        layer.backward(dy)
        once = [p.grad.copy() for p in layer.params]
        layer.backward(dy)
        for p, g in zip(layer.params, once, strict=True):
            np.testing.assert_allclose(p.grad, 2 * g, rtol=1e-5, atol=1e-6)
        assert ids == [(id(p.data), id(p.grad)) for p in layer.params]
        layer.zero_grad()
        assert all(not p.grad.any() for p in layer.params)
        assert ids == [(id(p.data), id(p.grad)) for p in layer.params]


def test_parameter():
    p = Parameter("features.0.weight", np.ones((2, 3), dtype=np.float64))
    assert p.name == "features.0.weight" and p.data.dtype == np.float32
    assert p.grad.shape == (2, 3) and p.grad.dtype == np.float32 and not p.grad.any()
    assert p.data.flags.c_contiguous and p.grad.flags.c_contiguous


# ---------------------------------------------------------------------------
# bad input: clear ValueError naming the layer, never a crash
# ---------------------------------------------------------------------------

bad_inputs = [
    (lambda: Conv2D(3, 4, 3), np.zeros((2, 3, 8), np.float32), "Conv2D"),
    (lambda: Conv2D(3, 4, 3), np.zeros((2, 2, 8, 8), np.float32), "3 channels"),
    (lambda: Conv2D(3, 4, 3), np.zeros((2, 3, 8, 8), np.float64), "float32"),
    (lambda: Conv2D(3, 4, 5), np.zeros((2, 3, 2, 2), np.float32), "smaller"),
    (lambda: MaxPool2D(2), np.zeros((2, 3, 8), np.float32), "MaxPool2D"),
    (lambda: MaxPool2D(3), np.zeros((1, 1, 2, 2), np.float32), "smaller"),
    (lambda: AvgPool2D(2), np.zeros((2, 3, 4, 4), np.int32), "float32"),
    (lambda: GlobalAvgPool2D(), np.zeros((2, 3), np.float32), "GlobalAvgPool2D"),
    (lambda: BatchNorm2d(4), np.zeros((2, 3, 4, 4), np.float32), "4 channels"),
    (lambda: BatchNorm2d(3), np.zeros((1, 3, 1, 1), np.float32), "more than one"),
    (lambda: Linear(4, 2), np.zeros((2, 5), np.float32), "Linear"),
    (lambda: Linear(4, 2), np.zeros((2, 4, 1), np.float32), "in_features"),
    (lambda: ReLU(), np.zeros(3, np.float16), "float32"),
    (lambda: Flatten(), np.zeros(3, np.float32), "Flatten"),
    (lambda: Dropout(), np.zeros(3, np.float64), "float32"),
]


@pytest.mark.parametrize("make, x, message", bad_inputs)
def test_bad_input_raises_value_error(make, x, message):
    with pytest.raises(ValueError, match=message):
        make().forward(x)


def test_non_array_input_raises_type_error():
    with pytest.raises(TypeError, match="ReLU"):
        ReLU().forward([1.0, 2.0])


def test_bad_gradient_and_backward_before_forward():
    layer = Conv2D(1, 1, 3)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((1, 1, 1, 1), np.float32))
    layer.forward(np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="gradient of shape"):
        layer.backward(np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="float32"):
        layer.backward(np.zeros((1, 1, 1, 1), np.float64))
    with pytest.raises(ValueError, match="padding"):
        MaxPool2D(2, padding=2)


def test_set_num_threads():
    import numba

    cnn.set_num_threads(1)
    assert numba.get_num_threads() == 1
    cnn.set_num_threads(10**6)
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    with pytest.raises(ValueError):
        cnn.set_num_threads(0)


@pytest.mark.parametrize("imports, call, preset, expected", [
    ("cnn, engine", "", {}, (None, None)),              # nothing is set at import...
    ("engine, cnn", "", {}, (None, None)),              # ... in either order
    ("cnn, engine", "False", {}, ("PASSIVE", "30000")),  # compute alone: a bounded spin
    ("engine, cnn", "False", {}, ("PASSIVE", "30000")),
    ("cnn, engine", "True", {}, ("PASSIVE", "0")),      # beside the progress thread: no spin
    ("engine, cnn", "True", {}, ("PASSIVE", "0")),
    ("cnn", "False", {"OMP_WAIT_POLICY": "ACTIVE"}, ("ACTIVE", None)),  # the user's choice wins
    ("engine, cnn", "True", {"GOMP_SPINCOUNT": "5"}, (None, "5")),
])
def test_runtime_configuration_is_explicit(imports, call, preset, expected):
    """What the environment holds for libgomp (read when numba starts its
    OpenMP workers) after importing cnn and engine in either order and then
    calling `cnn.runtime.configure`, in a fresh interpreter."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(preset)
    configure = f"cnn.runtime.configure(progress_thread={call}); " if call else ""
    code = (f"import os, json; import {imports}; import cnn.runtime; {configure}"
            "print(json.dumps([os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT')]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                         text=True).stdout
    assert tuple(json.loads(out.strip().splitlines()[-1])) == expected


def test_configure_after_the_openmp_workers_started_is_an_error():
    """A change of policy once numba's workers run would be silently ignored by libgomp."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import numpy as np, cnn.runtime as rt; rt.configure(progress_thread=False); "
            "from cnn.layers.activation import ReLU; ReLU().forward(np.ones((64, 64, 8, 8), np.float32)); "
            "rt.configure(progress_thread=False); rt.configure(progress_thread=True)")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode != 0
    assert "after numba started its OpenMP workers" in p.stderr


def _conv3x3_run(x, dy, out_channels, initial_grad=0.0, stride=1):
    """(layer, [y, dx, weight grad, bias grad]) of a fresh 3x3 padding-1 Conv2D
    (same initial weights every time) whose weight gradient starts at
    `initial_grad`, so that backward must accumulate onto it."""
    layer = Conv2D(x.shape[1], out_channels, 3, stride=stride, padding=1,
                   rng=np.random.default_rng(0))
    layer.weight.grad[...] = initial_grad
    y = layer.forward(x)
    dx = layer.backward(dy)
    return layer, [y, dx, layer.weight.grad.copy(), layer.bias.grad.copy()]


def _check_same_bits_and_reference(runs, x, dy, initial_grad=0.0):
    """Every run of `_conv3x3_run` gave the same bits, and the first matches
    the float64 reference."""
    stride = runs[0][0].stride
    for _, run in runs[1:]:
        for got, first in zip(run, runs[0][1]):
            assert np.array_equal(got, first)
    y, dx, dw, db = runs[0][1]
    w64 = runs[0][0].weight.data.astype(np.float64)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    close32(y, conv2d_forward_reference(x64, w64, np.zeros(w64.shape[0]), stride, (1, 1)))
    dx_ref, dw_ref, db_ref = conv2d_backward_reference(dy64, x64, w64, stride, (1, 1))
    close32(dx, dx_ref)
    close32(dw, dw_ref + initial_grad)
    close32(db, db_ref)


@pytest.mark.parametrize("threads", [1, 2])
def test_conv2d_same_bits_run_to_run(threads):
    """Chunks are taken by whichever thread is free, but their weight and bias
    gradients are added in chunk order: the same bits on every run."""
    import cnn.layers.conv as conv_module

    cnn.set_num_threads(threads)
    try:
        with patched(conv_module, CHUNK_ELEMENTS=27 * 64 * 3):  # ~3 samples per chunk: many chunks
            rng = np.random.default_rng(5)
            x = rng.standard_normal((37, 3, 8, 8)).astype(np.float32)
            dy = rng.standard_normal((37, 6, 8, 8)).astype(np.float32)
            runs = [_conv3x3_run(x, dy, 6, initial_grad=0.5) for _ in range(5)]
            _check_same_bits_and_reference(runs, x, dy, initial_grad=0.5)
    finally:
        cnn.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("algorithm, stride", [("winograd", 1), ("shifted", 1), ("im2col", 1),
                                               ("shifted", 2), ("im2col", 2)])
@FAST
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
       out_channels=st.integers(1, 5), padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       bias=st.booleans(), seed=seeds)
def test_conv3x3_algorithms_match_reference(algorithm, stride, shape, out_channels, padding, bias,
                                            seed):
    """The 3x3 layers, run by each algorithm that takes their stride (the
    shifted views at stride 2 read the padded sample's 4 phases)."""
    import cnn.layers.conv as conv_module
    import cnn.layers.winograd as winograd_module

    n, c, height, width = shape
    if height + 2 * padding[0] < 3 or width + 2 * padding[1] < 3:
        return
    rng = np.random.default_rng(seed)
    layer = Conv2D(c, out_channels, 3, stride, padding, bias=bias, rng=rng)
    thresholds = {"WINOGRAD_MIN_CHANNELS": 0 if algorithm == "winograd" else 10**9}
    for name in ("SHIFTED_MIN_SPAN", "SHIFTED_SPAN_PER_CHANNEL", "SHIFTED_MIN_CHANNELS"):
        thresholds[name] = 0 if algorithm == "shifted" else 10**9
    # the smallest column blocks (16): several per plane, the last one partial
    thresholds["SHIFTED_BLOCK_ELEMENTS"] = 0 if seed % 2 else conv_module.SHIFTED_BLOCK_ELEMENTS
    # Winograd pipelined per chunk (forward, dx and the weight gradient) for half the examples
    pipeline = {"PIPELINE_MIN_OUTPUTS": 0, "PIPELINE_PARTIALS": 10**9} if seed % 2 else {}
    with patched(conv_module, **thresholds), patched(winograd_module, **pipeline):
        assert layer._winograd() == (algorithm == "winograd")
        assert layer._shifted(shape) == (algorithm == "shifted")
        x = rng.standard_normal(shape).astype(np.float32)
        y = layer.forward(x)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        layer.weight.grad[...] = 0.25  # accumulates
        dx = layer.backward(dy)
    w64 = layer.weight.data.astype(np.float64)
    b64 = layer.bias.data.astype(np.float64) if bias else None
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    close32(y, conv2d_forward_reference(x64, w64, b64, (stride, stride), padding))
    dx_ref, dw_ref, db_ref = conv2d_backward_reference(dy64, x64, w64, (stride, stride), padding)
    close32(dx, dx_ref)
    close32(layer.weight.grad, dw_ref + 0.25)
    if bias:
        close32(layer.bias.grad, db_ref)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv3x3_shifted_same_bits_run_to_run(threads, stride):
    """The shifted-view layers' weight gradient is summed per chunk, chunks in order."""
    cnn.set_num_threads(threads)
    try:
        rng = np.random.default_rng(6)
        height, width = (7, 9) if stride == 1 else (17, 20)  # stride 2: 9 x 10 out
        x = rng.standard_normal((37, 8, height, width)).astype(np.float32)
        dy = rng.standard_normal((37, 12, 7, 9) if stride == 1 else (37, 12, 9, 10)).astype(np.float32)
        runs = [_conv3x3_run(x, dy, 12, stride=stride) for _ in range(4)]
        assert all(layer._shifted(x.shape) for layer, _ in runs)
        _check_same_bits_and_reference(runs, x, dy)
        layer = runs[-1][0]
        layer.zero_grad()
        layer.skip_input_grad = True
        assert layer.backward(dy) is None
        assert np.array_equal(layer.weight.grad, runs[0][1][2])
    finally:
        cnn.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 5, 7), (3, 1, 2, 3)])
def test_maxpool_2x2_fast_path_matches_reference(shape):
    """MaxPool2D(2) has its own forward kernel; ties go to the first maximum."""
    rng = np.random.default_rng(7)
    x = rng.integers(-2, 3, size=shape).astype(np.float32)  # many ties
    layer = MaxPool2D(2)
    assert layer._fast_path()
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(dy)
    y_ref, argmax = maxpool2d_forward_reference(x.astype(np.float64), (2, 2), (2, 2), (0, 0))
    np.testing.assert_array_equal(y, y_ref)
    dx_ref = maxpool2d_backward_reference(dy.astype(np.float64), argmax, shape, (2, 2), (2, 2),
                                          (0, 0))
    close32(dx, dx_ref)


# ---------------------------------------------------------------------------
# Winograd F(2x2, 3x3)
# ---------------------------------------------------------------------------


@FAST
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 8), st.integers(1, 8)),
       out_channels=st.integers(1, 3), padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       seed=seeds)
def test_winograd_references_match_direct_convolution(shape, out_channels, padding, seed):
    """The numpy F(2x2, 3x3) references are exact in float64 (to rounding)."""
    from cnn.layers.winograd import winograd_forward_reference, winograd_weight_grad_reference

    n, c, height, width = shape
    if height + 2 * padding[0] < 3 or width + 2 * padding[1] < 3:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((out_channels, c, 3, 3))
    b = rng.standard_normal(out_channels)
    y = conv2d_forward_reference(x, w, b, (1, 1), padding)
    np.testing.assert_allclose(winograd_forward_reference(x, w, b, padding), y, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    _, dw, _ = conv2d_backward_reference(dy, x, w, (1, 1), padding)
    np.testing.assert_allclose(winograd_weight_grad_reference(dy, x, padding), dw, atol=1e-12)


# 7x5 outputs: 4 x 3 tiles; 16 * 128 values per tile (64 channels in and out)
@pytest.mark.parametrize("chunk_elements, pipelined", [
    (16 * 128 * 12 * 2, False),   # 2 samples per chunk: 5 chunks, three parallel phases each
    (16 * 128 * 12 * 2, True),    # the same chunks, each on one thread (forward and dx)
    (16 * 128 * 3 * 3, False),    # one sample in bands of 3 tile rows and 1 row: 18 chunks
])
def test_winograd_same_bits_for_any_thread_count(chunk_elements, pipelined):
    """Chunks depend on the layer shape only and every output element is one
    thread's work: 1 and 2 threads give the same bits, run after run, also with
    many chunks, bands of tile rows, the pipelined kernels and odd
    (partial-tile) sizes."""
    import cnn.layers.winograd as winograd_module

    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 64, 7, 5)).astype(np.float32)
    dy = rng.standard_normal((9, 64, 7, 5)).astype(np.float32)
    runs = []
    try:
        with patched(winograd_module, CHUNK_ELEMENTS=chunk_elements,
                     PIPELINE_MIN_OUTPUTS=0 if pipelined else 10**9,
                     PIPELINE_ELEMENTS=16 * 128 * 12 * 2, PIPELINE_PARTIALS=10**9):
            # pipelined: 5 chunks of 2 samples, 5 weight-gradient partials
            assert winograd_module._pipeline_chunk(9, 64, 64, 7, 5) == (2 if pipelined else 0)
            assert len(winograd_module._chunks(9, 4, 3, 128)) == (
                5 if chunk_elements > 16 * 128 * 12 else 18)
            for threads in (1, 2, 1, 2):
                cnn.set_num_threads(threads)
                runs.append(_conv3x3_run(x, dy, 64, initial_grad=0.5))
    finally:
        cnn.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert all(layer._winograd() for layer, _ in runs)
    _check_same_bits_and_reference(runs, x, dy, initial_grad=0.5)


def test_winograd_skip_input_grad_and_no_bias():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 64, 4, 6)).astype(np.float32)
    layer = Conv2D(64, 64, 3, padding=2, bias=False, rng=rng)
    assert layer._winograd()
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    layer.skip_input_grad = True
    assert layer.backward(dy) is None
    _, dw_ref, _ = conv2d_backward_reference(dy.astype(np.float64), x.astype(np.float64),
                                             layer.weight.data.astype(np.float64), (1, 1), (2, 2))
    close32(layer.weight.grad, dw_ref)
    close32(y, conv2d_forward_reference(x.astype(np.float64),
                                        layer.weight.data.astype(np.float64), None, (1, 1), (2, 2)))


def test_winograd_sgemm_row_blocks():
    """More threads than the 16 products: each product split into row blocks."""
    from cnn.layers.blas import single_threaded_blas
    from cnn.layers.winograd import batched_sgemm

    rng = np.random.default_rng(9)
    a = rng.standard_normal((16, 37, 20)).astype(np.float32)
    b = rng.standard_normal((16, 20, 11)).astype(np.float32)
    bt = np.ascontiguousarray(b.transpose(0, 2, 1))
    expected = np.einsum("kij,kjl->kil", a.astype(np.float64), b.astype(np.float64))
    for row_blocks in (1, 3, 64):
        c = np.full((16, 37, 11), 2.0, dtype=np.float32)
        with single_threaded_blas():
            batched_sgemm(False, a, b, 1.0, c, row_blocks)
        close32(c, expected + 2.0)
        with single_threaded_blas():
            batched_sgemm(True, a, bt, 0.0, c, row_blocks)
        close32(c, expected)


@pytest.mark.parametrize("threads", [1, 2])
@FAST
@given(m=st.integers(1, 70), k=st.integers(1, 9), n=st.integers(1, 70),
       trans_a=st.booleans(), trans_b=st.booleans(), seed=seeds)
def test_matmul_on_numba_threads(threads, m, k, n, trans_a, trans_b, seed):
    """cnn.layers.blas.matmul: transposed views, single rows, accumulation."""
    from cnn.layers.blas import matmul

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    a_op, b_op = (a.T if trans_a else a), (b.T if trans_b else b)
    expected = a_op.astype(np.float64) @ b_op.astype(np.float64)
    cnn.set_num_threads(threads)
    try:
        close32(matmul(a_op, b_op), expected)
        out = np.ones((m, n), dtype=np.float32)
        assert matmul(a_op, b_op, out=out, accumulate=True) is out
        close32(out, expected + 1.0)
    finally:
        cnn.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_winograd_float32_error_as_small_as_im2col():
    """Against a float64 oracle, Winograd's float32 result and gradients are
    about as accurate as im2col's on a 128-channel layer."""
    import cnn.layers.conv as conv_module

    rng = np.random.default_rng(10)
    x = rng.standard_normal((4, 128, 8, 8)).astype(np.float32)
    dy = rng.standard_normal((4, 128, 8, 8)).astype(np.float32)
    results = {}
    for algorithm in ("winograd", "im2col"):
        off = {"WINOGRAD_MIN_CHANNELS": 10**9, "SHIFTED_MIN_CHANNELS": 10**9} if algorithm == "im2col" else {}
        with patched(conv_module, **off):
            layer = Conv2D(128, 128, 3, padding=1, rng=np.random.default_rng(0))
            y = layer.forward(x)
            dx = layer.backward(dy)
        results[algorithm] = (y, dx, layer.weight.grad.copy())
    w64 = layer.weight.data.astype(np.float64)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    y_ref = conv2d_forward_reference(x64, w64, np.zeros(128), (1, 1), (1, 1))
    dx_ref, dw_ref, _ = conv2d_backward_reference(dy64, x64, w64, (1, 1), (1, 1))
    for index, reference in enumerate((y_ref, dx_ref, dw_ref)):
        winograd, im2col = (np.linalg.norm(results[a][index] - reference) / np.linalg.norm(reference)
                            for a in ("winograd", "im2col"))
        assert winograd < 1e-6
        assert winograd <= 4 * im2col, (index, winograd, im2col)
