"""SGD with momentum, whole parameters or slices of them.

The update is element-wise, so it is written once as a kernel on flat 1-D
arrays (`sgd_update`) and used both by `SGD.step` and by the engine, which in
the multi-step algorithm updates only elements [start, stop) of each layer's
flattened parameter and keeps momentum for that slice alone. Because every
element sees the same float32 operations in the same order, updating a
parameter whole or in any number of slices gives bitwise identical results.

Semantics follow ``torch.optim.SGD`` (no dampening)::

    d = g + weight_decay * w
    v = momentum * v + d
    d = d + momentum * v   if nesterov else   v
    w = w - lr * d
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numba
import numpy as np

__all__ = ["SGD", "sgd_update", "sgd_update_reference"]


def sgd_update_reference(w, g, v, lr, momentum, weight_decay, nesterov):
    """Plain-numpy SGD step, in place; the teaching version and test oracle.

    Parameters
    ----------
    w : ndarray of shape (n,), float32
        Weights (a view into the parameter), updated in place.
    g : ndarray of shape (n,), float32
        Gradient, read only.
    v : ndarray of shape (n,), float32
        Momentum buffer, updated in place.
    lr, momentum, weight_decay : float
        Rounded to float32 first so that all arithmetic is float32, exactly
        as in the numba kernel.
    nesterov : bool
    """
    lr, momentum, weight_decay = np.float32(lr), np.float32(momentum), np.float32(weight_decay)
    # torch skips the add when weight_decay == 0 (0 * inf would be nan).
    d = g + weight_decay * w if weight_decay != 0 else g
    v *= momentum
    v += d
    step = d + momentum * v if nesterov else v
    w -= lr * step


@numba.njit(nogil=True, cache=True)
def _sgd_update_kernel(w, g, v, lr, momentum, weight_decay, nesterov):
    # One pass over memory instead of the reference's four; nogil so the
    # engine can run it on a thread while communication progresses.
    for i in range(w.shape[0]):
        d = g[i]
        if weight_decay != 0:
            d = d + weight_decay * w[i]
        m = momentum * v[i] + d
        v[i] = m
        if nesterov:
            d = d + momentum * m
        else:
            d = m
        w[i] = w[i] - lr * d


def sgd_update(w, g, v, lr, momentum, weight_decay=0.0, nesterov=False):
    """SGD step on one contiguous slice of a flattened parameter, in place.

    Parameters
    ----------
    w : ndarray of shape (n,), float32, C-contiguous
        Typically ``param.data.reshape(-1)[start:stop]``: a view, so the
        parameter itself is updated. Passing a copy silently loses the update.
    g : ndarray of shape (n,), float32, C-contiguous
        The (already averaged) gradient for the same elements.
    v : ndarray of shape (n,), float32, C-contiguous
        Momentum for the same elements, updated in place; start from zeros.
    lr, momentum, weight_decay : float
    nesterov : bool

    Raises
    ------
    ValueError
        If the arrays are not 1-D float32 C-contiguous of one length: the
        kernel would otherwise mix precisions or write into a temporary.
    """
    for label, a in (("w", w), ("g", g), ("v", v)):
        if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 1
                and a.flags.c_contiguous):
            raise ValueError(f"sgd_update: {label} must be a 1-D C-contiguous float32 array")
    if not (w.shape == g.shape == v.shape):
        raise ValueError(f"sgd_update: lengths differ: w {w.shape}, g {g.shape}, v {v.shape}")
    if not w.flags.writeable or not v.flags.writeable:
        raise ValueError("sgd_update: w and v must be writeable")
    _sgd_update_kernel(w, g, v, np.float32(lr), np.float32(momentum),
                       np.float32(weight_decay), bool(nesterov))


class SGD:
    """Stochastic gradient descent with momentum, like ``torch.optim.SGD``.

    Parameters
    ----------
    params : iterable of Parameter
        Objects with ``.name`` and float32 C-contiguous ``.data``/``.grad``
        of one shape (see docs/cnn_contract.md). Names key the state.
    lr : float
        Read at every `step`; set ``opt.lr = schedule(iteration)`` before it.
    momentum : float, default 0.9
    weight_decay : float, default 0.0
        L2 penalty added to the gradient (coupled, as in torch).
    nesterov : bool, default False
    slices : mapping of str to (int, int), optional
        ``name -> (start, stop)``: update only these elements of each
        parameter's flattened data and hold momentum only for them. This is
        the rank-local optimizer of the multi-step algorithm, where rank r
        owns one chunk of every layer. Every parameter in `params` needs an
        entry (``(0, 0)`` for one this rank does not update), so a forgotten
        parameter is an error rather than a silently frozen layer.

    Notes
    -----
    Momentum starts at zero, which equals torch's "first step copies the
    gradient" since ``momentum * 0 + d == d`` exactly.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, nesterov: bool = False,
                 slices: Mapping[str, tuple[int, int]] | None = None):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr={lr}, momentum={momentum}, weight_decay={weight_decay} "
                             "must be >= 0")
        if nesterov and momentum == 0:
            raise ValueError("SGD: nesterov momentum needs momentum > 0")
        self.params = list(params)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)

        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError("SGD: parameter names must be unique (they key the state)")
        for p in self.params:
            if not (p.data.dtype == np.float32 and p.grad.dtype == np.float32
                    and p.data.shape == p.grad.shape
                    and p.data.flags.c_contiguous and p.grad.flags.c_contiguous):
                raise ValueError(f"SGD: {p.name}: data and grad must be C-contiguous float32 "
                                 "arrays of one shape")

        if slices is None:
            self.slices = {p.name: (0, p.data.size) for p in self.params}
        else:
            unknown = set(slices) - set(names)
            missing = set(names) - set(slices)
            if unknown or missing:
                raise ValueError(f"SGD: slices must name exactly the parameters; "
                                 f"unknown {sorted(unknown)}, missing {sorted(missing)}")
            self.slices = {}
            for p in self.params:
                start, stop = (int(i) for i in slices[p.name])
                if not 0 <= start <= stop <= p.data.size:
                    raise ValueError(f"SGD: slice [{start}, {stop}) out of range for "
                                     f"{p.name} of size {p.data.size}")
                self.slices[p.name] = (start, stop)
        self.momentum_buffers = {name: np.zeros(stop - start, np.float32)
                                 for name, (start, stop) in self.slices.items()}

    def step(self, grads: Mapping[str, np.ndarray] | None = None):
        """Apply one update to every owned slice.

        Parameters
        ----------
        grads : mapping of str to ndarray of shape (stop - start,), float32, optional
            Gradients for the owned slices, e.g. the output of a
            reduce-scatter; by default the slice of ``param.grad``.
        """
        for p in self.params:
            start, stop = self.slices[p.name]
            if start == stop:
                continue
            g = p.grad.reshape(-1)[start:stop] if grads is None else grads[p.name]
            sgd_update(p.data.reshape(-1)[start:stop], g, self.momentum_buffers[p.name],
                       self.lr, self.momentum, self.weight_decay, self.nesterov)

    def zero_grad(self):
        """Zero every ``.grad`` in place (backward accumulates into it)."""
        for p in self.params:
            p.grad.fill(0)

    def state_dict(self, momentum_buffers: bool = True) -> dict:
        """Hyperparameters and momentum, as plain numbers and array copies.

        Parameters
        ----------
        momentum_buffers : bool
            False: leave the momentum out (no copy), for a caller that stores
            it another way (a sharded checkpoint).

        Returns
        -------
        dict
            ``{"lr", "momentum", "weight_decay", "nesterov": number/bool,
            "slices": {name: [start, stop]}, "momentum_buffers": {name:
            ndarray of shape (stop - start,), float32}}``.
        """
        state = {
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "nesterov": self.nesterov,
            "slices": {name: [start, stop] for name, (start, stop) in self.slices.items()},
        }
        if momentum_buffers:
            state["momentum_buffers"] = {name: v.copy()
                                         for name, v in self.momentum_buffers.items()}
        return state

    def load_state_dict(self, state: Mapping):
        """Restore `state_dict` output; momentum is copied into the existing buffers.

        Raises
        ------
        ValueError
            If the parameter names or slice bounds differ: momentum for other
            elements cannot continue this run (re-slice it first).
        """
        slices = {name: tuple(int(i) for i in bounds) for name, bounds in state["slices"].items()}
        if slices != self.slices:
            raise ValueError(f"SGD.load_state_dict: state is for slices {slices}, "
                             f"this optimizer owns {self.slices}")
        buffers = state["momentum_buffers"]
        for name, v in self.momentum_buffers.items():
            if name not in buffers:
                raise ValueError(f"SGD.load_state_dict: no momentum buffer for {name}")
            saved = np.asarray(buffers[name])
            if saved.shape != v.shape:
                raise ValueError(f"SGD.load_state_dict: {name}: momentum shape {saved.shape}, "
                                 f"expected {v.shape}")
            v[...] = saved
        self.lr = float(state["lr"])
        self.momentum = float(state["momentum"])
        self.weight_decay = float(state["weight_decay"])
        self.nesterov = bool(state["nesterov"])
