"""SGD (whole and sliced) and learning-rate schedules."""

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnn.optim import SGD, sgd_update, sgd_update_reference
from cnn.schedules import Constant, Cosine, LinearWarmup, StepDecay, scaled_lr

UPDATES = {"numba": sgd_update, "numpy": sgd_update_reference}
HYPER = [  # (momentum, weight_decay, nesterov)
    (0.9, 0.0, False),
    (0.9, 5e-4, False),
    (0.9, 1e-4, True),
    (0.0, 1e-2, False),
]


@dataclass
class Param:
    """Stand-in for cnn.layers.Parameter (docs/cnn_contract.md)."""

    name: str
    data: np.ndarray
    grad: np.ndarray


def make_params(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [Param(f"layer{i}.weight", rng.standard_normal(s, np.float32),
                  np.zeros(s, np.float32)) for i, s in enumerate(shapes)]


def clone(params):
    return [Param(p.name, p.data.copy(), p.grad.copy()) for p in params]


def fill_grads(params, rng):
    for p in params:
        p.grad[...] = rng.standard_normal(p.grad.shape, np.float32)


def chunk_bounds(size, parts):
    """Near-even split of range(size) into `parts` contiguous chunks."""
    edges = [size * k // parts for k in range(parts + 1)]
    return list(itertools.pairwise(edges))


def torch_sgd_step(w, g, buf, lr, momentum, weight_decay, nesterov):
    """torch.optim.SGD's algorithm written out (first step copies d into buf)."""
    d = g + np.float32(weight_decay) * w if weight_decay else g
    if momentum:
        buf = d.copy() if buf is None else np.float32(momentum) * buf + d
        d = d + np.float32(momentum) * buf if nesterov else buf
    return w - np.float32(lr) * d, buf


@pytest.mark.parametrize("impl", UPDATES)
def test_hand_computed_momentum_steps(impl):
    # w = 1, g = 0.5, lr = 0.1, momentum = 0.9:
    # plain:    v = 0.5, w = 0.95;   v = 0.95, w = 0.855
    # nesterov: v = 0.5, d = 0.95, w = 0.905
    w, g, v = np.ones(1, np.float32), np.full(1, 0.5, np.float32), np.zeros(1, np.float32)
    UPDATES[impl](w, g, v, 0.1, 0.9, 0.0, False)
    np.testing.assert_allclose([w[0], v[0]], [0.95, 0.5], rtol=1e-6)
    UPDATES[impl](w, g, v, 0.1, 0.9, 0.0, False)
    np.testing.assert_allclose([w[0], v[0]], [0.855, 0.95], rtol=1e-6)
    w, v = np.ones(1, np.float32), np.zeros(1, np.float32)
    UPDATES[impl](w, g, v, 0.1, 0.9, 0.0, True)
    np.testing.assert_allclose(w[0], 0.905, rtol=1e-6)


@pytest.mark.parametrize("impl", UPDATES)
@pytest.mark.parametrize("momentum,weight_decay,nesterov", HYPER)
def test_matches_torch_algorithm(impl, momentum, weight_decay, nesterov):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(257, np.float32)
    v = np.zeros_like(w)
    w_torch, buf = w.copy(), None
    for _ in range(5):
        g = rng.standard_normal(w.shape, np.float32)
        UPDATES[impl](w, g, v, 0.05, momentum, weight_decay, nesterov)
        w_torch, buf = torch_sgd_step(w_torch, g, buf, 0.05, momentum, weight_decay, nesterov)
    np.testing.assert_array_equal(w, w_torch)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 300), seed=st.integers(0, 2**32 - 1),
       hyper=st.sampled_from(HYPER), lr=st.floats(1e-4, 1.0))
def test_numba_kernel_bitwise_equals_numpy_reference(n, seed, hyper, lr):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n, np.float32)
    v = rng.standard_normal(n, np.float32)
    g = rng.standard_normal(n, np.float32)
    w2, v2 = w.copy(), v.copy()
    sgd_update(w, g, v, lr, *hyper)
    sgd_update_reference(w2, g, v2, lr, *hyper)
    np.testing.assert_array_equal(w, w2)
    np.testing.assert_array_equal(v, v2)


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
                       min_size=1, max_size=4),
       world_size=st.integers(1, 7), hyper=st.sampled_from(HYPER),
       seed=st.integers(0, 1000))
def test_whole_and_sliced_updates_are_bitwise_identical(shapes, world_size, hyper, seed):
    momentum, weight_decay, nesterov = hyper
    whole = make_params(shapes, seed)
    sliced = clone(whole)
    opt = SGD(whole, lr=0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    # One optimizer per "rank", each owning chunk r of every parameter, all
    # writing into the same arrays (chunks can be empty when P > size).
    ranks = [SGD(sliced, lr=0.1, momentum=momentum, weight_decay=weight_decay,
                 nesterov=nesterov,
                 slices={p.name: chunk_bounds(p.data.size, world_size)[r] for p in sliced})
             for r in range(world_size)]
    rng = np.random.default_rng(seed)
    for _ in range(3):
        fill_grads(whole, rng)
        for p, q in zip(whole, sliced):
            q.grad[...] = p.grad
        opt.step()
        for rank_opt in ranks:
            rank_opt.step()
    for p, q in zip(whole, sliced):
        np.testing.assert_array_equal(p.data, q.data)
        momentum_from_ranks = np.concatenate([r.momentum_buffers[p.name] for r in ranks])
        np.testing.assert_array_equal(opt.momentum_buffers[p.name], momentum_from_ranks)


def test_sliced_step_touches_only_its_slice_and_accepts_external_grads():
    (p,) = make_params([(4, 5)])
    before = p.data.copy()
    opt = SGD([p], lr=0.5, momentum=0.0, slices={p.name: (3, 11)})
    g = np.ones(8, np.float32)
    opt.step(grads={p.name: g})
    flat, flat_before = p.data.reshape(-1), before.reshape(-1)
    np.testing.assert_array_equal(flat[:3], flat_before[:3])
    np.testing.assert_array_equal(flat[11:], flat_before[11:])
    np.testing.assert_array_equal(flat[3:11], flat_before[3:11] - np.float32(0.5))
    assert opt.momentum_buffers[p.name].shape == (8,)


def test_update_writes_through_a_view_of_the_parameter():
    (p,) = make_params([(2, 3, 3)])
    expected = p.data.reshape(-1)[4:9] - np.float32(0.1)
    sgd_update(p.data.reshape(-1)[4:9], np.ones(5, np.float32), np.zeros(5, np.float32),
               0.1, 0.9)
    np.testing.assert_array_equal(p.data.reshape(-1)[4:9], expected)


def test_zero_grad_is_in_place():
    params = make_params([(3,), (2, 2)])
    grads = [p.grad for p in params]
    fill_grads(params, np.random.default_rng(0))
    SGD(params, lr=0.1).zero_grad()
    for p, g in zip(params, grads):
        assert p.grad is g and not g.any()


@pytest.mark.parametrize("slices", [None, {"layer0.weight": (2, 7), "layer1.weight": (0, 0)}])
def test_state_dict_round_trip_continues_identically(slices):
    params = make_params([(3, 4), (5,)])
    rng = np.random.default_rng(3)
    opt = SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True, slices=slices)
    for _ in range(3):
        fill_grads(params, rng)
        opt.step()
    state = opt.state_dict()
    resumed_params = clone(params)
    resumed = SGD(resumed_params, lr=1.0, momentum=0.5, slices=slices)
    resumed.load_state_dict(state)
    assert (resumed.lr, resumed.momentum, resumed.nesterov) == (0.1, 0.9, True)
    for _ in range(3):
        fill_grads(params, rng)
        for p, q in zip(params, resumed_params):
            q.grad[...] = p.grad
        opt.step()
        resumed.step()
    for p, q in zip(params, resumed_params):
        np.testing.assert_array_equal(p.data, q.data)


def test_state_dict_holds_copies_of_plain_arrays():
    params = make_params([(3,)])
    opt = SGD(params, lr=0.1)
    state = opt.state_dict()
    state["momentum_buffers"]["layer0.weight"][:] = 7
    assert not opt.momentum_buffers["layer0.weight"].any()
    assert isinstance(state["momentum_buffers"]["layer0.weight"], np.ndarray)


def test_load_state_dict_refuses_other_slices():
    params = make_params([(10,)])
    state = SGD(params, lr=0.1, slices={"layer0.weight": (0, 5)}).state_dict()
    with pytest.raises(ValueError, match="slices"):
        SGD(params, lr=0.1).load_state_dict(state)


@pytest.mark.parametrize("bad", [
    lambda p: SGD(p, lr=0.1, momentum=0.0, nesterov=True),
    lambda p: SGD(p, lr=-1.0),
    lambda p: SGD(p, lr=0.1, slices={}),
    lambda p: SGD(p, lr=0.1, slices={"layer0.weight": (0, 4), "nope": (0, 1)}),
    lambda p: SGD(p, lr=0.1, slices={"layer0.weight": (3, 99)}),
    lambda p: SGD([Param("x", np.zeros(3), np.zeros(3))], lr=0.1),
    lambda p: SGD([Param("x", np.zeros((4, 4), np.float32)[:, ::2],
                         np.zeros((4, 2), np.float32))], lr=0.1),
    lambda p: SGD(p + p, lr=0.1),
])
def test_invalid_configurations_raise(bad):
    with pytest.raises(ValueError):
        bad(make_params([(4,)]))


@pytest.mark.parametrize("w,g,v", [
    (np.zeros(4), np.zeros(4, np.float32), np.zeros(4, np.float32)),
    (np.zeros(4, np.float32), np.zeros(3, np.float32), np.zeros(4, np.float32)),
    (np.zeros(8, np.float32)[::2], np.zeros(4, np.float32), np.zeros(4, np.float32)),
    (np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32)),
])
def test_sgd_update_rejects_arrays_it_would_mishandle(w, g, v):
    with pytest.raises(ValueError):
        sgd_update(w, g, v, 0.1, 0.9)


# --- schedules --------------------------------------------------------------

def test_step_decay():
    schedule = StepDecay(0.4, milestones=[10, 20], gamma=0.1)
    values = [schedule(i) for i in (0, 9, 10, 19, 20, 1000)]
    np.testing.assert_allclose(values, [0.4, 0.4, 0.04, 0.04, 0.004, 0.004])
    with pytest.raises(ValueError):
        StepDecay(0.1, [20, 10])


def test_cosine_endpoints_and_monotone():
    schedule = Cosine(1.0, total_iters=100, min_lr=0.1)
    values = np.array([schedule(i) for i in range(120)])
    assert values[0] == 1.0 and math.isclose(values[50], 0.55)
    assert np.all(np.diff(values) <= 0) and np.all(values[100:] == pytest.approx(0.1))


@pytest.mark.parametrize("start_factor", [0.0, 1 / 8])
def test_goyal_warmup_then_step_decay(start_factor):
    lr = scaled_lr(0.1, global_batch=2048)
    assert lr == pytest.approx(0.8)
    schedule = LinearWarmup(StepDecay(lr, [300, 600]), warmup_iters=50, start_factor=start_factor)
    assert schedule(0) == pytest.approx(start_factor * lr)
    assert schedule(25) == pytest.approx(lr * (start_factor + (1 - start_factor) / 2))
    assert schedule(50) == pytest.approx(lr) and schedule(299) == pytest.approx(lr)
    assert schedule(300) == pytest.approx(lr / 10)
    warm = [schedule(i) for i in range(51)]
    assert np.all(np.diff(warm) > 0)


def test_warmup_is_continuous_into_cosine():
    schedule = LinearWarmup(Cosine(1.0, 100), warmup_iters=10)
    assert schedule(9) < schedule(10) == Cosine(1.0, 100)(10)
    assert LinearWarmup(Constant(0.3), 0)(0) == 0.3


@settings(max_examples=20, deadline=None)
@given(start=st.integers(0, 500))
def test_schedules_are_pure_so_resuming_gives_the_same_lr(start):
    def make():
        return LinearWarmup(Cosine(0.5, 400, min_lr=0.01), warmup_iters=40, start_factor=0.1)
    uninterrupted = make()
    full = [uninterrupted(i) for i in range(start + 20)]
    resumed = make()  # a fresh object, as after a restart
    assert [resumed(i) for i in range(start, start + 20)] == full[start:]


def test_negative_iteration_is_an_error():
    with pytest.raises(ValueError):
        Constant(0.1)(-1)
