"""`Model`: the interface the distributed engine sees (docs/cnn_contract.md).

A model is a `Sequential` of named children plus the bookkeeping the engine
relies on:

* ``model.layers`` - the leaf layers that own parameters, in forward order. Index
  ``i`` into this list is the unit of both hooks.
* hooks - ``fn(i, layer)`` just before layer i's forward (``pre_forward``), and
  right after layer i's backward, when its gradients are final (``grad_ready``).
  The engine starts communicating a layer's gradient from the grad-ready hook
  while backward carries on below it.
* ``state_dict`` / ``load_state_dict`` - torchvision's names and layouts, so a
  checkpoint moves between this code and PyTorch unchanged.
* ``param_groups`` - the parameters of each natural unit (a convolution and
  the batch norm right after it, or one layer's weight and bias) stored in
  one flat buffer, every ``Parameter``'s ``data`` and ``grad`` a view into it,
  so the engine exchanges a unit with one collective and no copy.

Parameter names are fixed when the model is built: ``Parameter.name`` is its
state_dict key (``layer1.0.conv1.weight``), buffers follow PyTorch's per-module
order (``weight, bias, running_mean, running_var, num_batches_tracked``).
"""

from collections import namedtuple
from contextlib import contextmanager

import numpy as np

from .containers import Sequential

__all__ = ["HookHandle", "Model", "ParamGroup", "StateDictError"]

#: Buffer attribute names of leaf layers, in PyTorch's registration order.
BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class StateDictError(ValueError):
    """A state dict does not match the model: lists every offending key.

    Attributes
    ----------
    missing, unexpected : list of str
    mismatched : list of (key, expected_shape, got_shape)
    """

    def __init__(self, model_name, missing, unexpected, mismatched):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"state_dict does not match model {model_name!r}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        for key, expected, got in mismatched:
            lines.append(f"  shape mismatch for {key}: model has {expected}, state_dict has {got}")
        super().__init__("\n".join(lines))


class HookHandle:
    """Returned by the ``register_*_hook`` methods; ``remove()`` unregisters."""

    def __init__(self, hooks, fn):
        self._hooks, self._fn = hooks, fn

    def remove(self):
        if self._fn in self._hooks:
            self._hooks.remove(self._fn)


class ParamGroup:
    """Consecutive parameter layers whose parameters share one flat buffer.

    Attributes
    ----------
    layers : tuple of int
        Indices into ``model.layers``, consecutive, increasing.
    params : list of Parameter
        Their parameters in forward order; ``p.data`` and ``p.grad`` are views
        of `data` and `grad`.
    data, grad : ndarray of shape (n,), float32
        The flat storage: every parameter of the group, in order.
    spans : dict of int to (int, int)
        Each layer's range [start, stop) in the flat buffers.
    """

    def __init__(self, layers, leaves):
        self.layers = tuple(layers)
        self.params = [p for leaf in leaves for p in leaf.params]
        n = sum(p.data.size for p in self.params)
        self.data = np.empty(n, np.float32)
        self.grad = np.zeros(n, np.float32)
        self.spans, offset = {}, 0
        for i, leaf in zip(self.layers, leaves):
            start = offset
            for p in leaf.params:
                stop = offset + p.data.size
                self.data[offset:stop] = p.data.reshape(-1)
                self.grad[offset:stop] = p.grad.reshape(-1)
                # Rebinding happens once, here, before any optimizer or strategy
                # holds the arrays; from now on they are only written in place.
                p.data = self.data[offset:stop].reshape(p.data.shape)
                p.grad = self.grad[offset:stop].reshape(p.grad.shape)
                offset = stop
            self.spans[i] = (start, offset)

    @property
    def first(self) -> int:
        """The layer whose pre-forward needs the group and whose grad-ready completes it."""
        return self.layers[0]

    def span(self, layers) -> tuple[np.ndarray, np.ndarray]:
        """(data, grad) views of the consecutive `layers` of this group."""
        start, stop = self.spans[min(layers)][0], self.spans[max(layers)][1]
        return self.data[start:stop], self.grad[start:stop]

    def __repr__(self):
        return f"ParamGroup(layers={self.layers}, {self.data.size} values)"


def natural_units(layers) -> list[list[int]]:
    """Group parameter layers: a convolution with the batch norm right after it, else alone.

    The batch norm normalises exactly that convolution's output channels; the
    two are one unit of the network (and of torchvision's names: ``conv1`` /
    ``bn1``, ``downsample.0`` / ``downsample.1``).
    """
    from cnn.layers import BatchNorm2d, Conv2D

    units, i = [], 0
    while i < len(layers):
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if (isinstance(layers[i], Conv2D) and isinstance(nxt, BatchNorm2d)
                and nxt.num_features == layers[i].out_channels):
            units.append([i, i + 1])
            i += 2
        else:
            units.append([i])
            i += 1
    return units


class Model(Sequential):
    """A network with the engine's interface.

    Parameters
    ----------
    name : str
        Architecture name (``"resnet20"``), used in error messages.
    input_shape : tuple (C, H, W)
        The one input shape this model accepts (checked by `forward`).
    num_classes : int
    *layers : layers or ``(name, layer)`` pairs
        Top-level children, as for `Sequential`; their names are the first
        component of the parameter names.
    """

    def __init__(self, name, input_shape, num_classes, *layers):
        super().__init__(*layers)
        self.name = name
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self._last_output_shape = None
        self._index()
        self.compute_input_grad = False

    @property
    def compute_input_grad(self):
        """Whether `backward` returns dx (the gradient of the input images).

        Off by default: nobody needs it for training, and skipping it saves the
        first layer's col2im (as PyTorch, where the input does not require grad).
        """
        first = self.leaves()[0][1]
        return not getattr(first, "skip_input_grad", False)

    @compute_input_grad.setter
    def compute_input_grad(self, value):
        first = self.leaves()[0][1]
        if hasattr(first, "skip_input_grad"):
            first.skip_input_grad = not value

    def _index(self):
        """Name every parameter, collect ``layers``/buffers, share one dispatcher."""
        dispatcher = self.dispatcher
        for container in self.containers():
            container.dispatcher = dispatcher
        self.layers, self._params, self._buffers, self._state = [], [], [], []
        for path, leaf in self.walk():
            dispatcher.names[id(leaf)] = path
            if leaf.params:
                dispatcher.index[id(leaf)] = len(self.layers)
                self.layers.append(leaf)
            for p in leaf.params:
                # The layer names its parameters "weight"/"bias"; the model prefixes the path.
                p.name = f"{path}.{p.name.rsplit('.', 1)[-1]}"
                self._params.append(p)
                self._state.append((p.name, leaf, None, p))
            for attr in BUFFER_NAMES:
                if getattr(leaf, attr, None) is not None:
                    key = f"{path}.{attr}"
                    self._buffers.append((key, leaf, attr))
                    self._state.append((key, leaf, attr, None))
        keys = [key for key, *_ in self._state]
        if len(set(keys)) != len(keys):
            raise ValueError(f"model {self.name!r}: duplicate state_dict keys")
        self.param_groups = [ParamGroup(unit, [self.layers[i] for i in unit])
                             for unit in natural_units(self.layers)]

    # -- the contract ---------------------------------------------------------
    def parameters(self):
        """All Parameters in forward order (``Parameter.name`` is the state_dict key)."""
        return list(self._params)

    def named_parameters(self):
        return [(p.name, p) for p in self._params]

    def buffers(self):
        """``(name, array)`` pairs of non-trainable state (BN statistics), forward order.

        The arrays are the live ones: writing into them changes the model.
        """
        return [(key, self._buffer_array(leaf, attr)) for key, leaf, attr in self._buffers]

    def num_parameters(self):
        return sum(p.data.size for p in self._params)

    def forward(self, x, train=True):
        """Logits for a batch.

        Parameters
        ----------
        x : ndarray of shape (N, C, H, W), float32
            ``(C, H, W)`` must equal ``model.input_shape``; other real dtypes
            are converted to float32.
        train : bool
            Training mode: BatchNorm uses batch statistics and updates its
            running statistics, Dropout drops.

        Returns
        -------
        logits : ndarray of shape (N, num_classes), float32
        """
        if not isinstance(x, np.ndarray):
            raise TypeError(f"model {self.name!r}: expected a numpy array, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1:] != self.input_shape or x.shape[0] < 1:
            c, h, w = self.input_shape
            raise ValueError(
                f"model {self.name!r} expects input of shape (N, {c}, {h}, {w}) with N >= 1, "
                f"got {x.shape}"
            )
        if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"model {self.name!r}: expected a real-valued input, got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        logits = super().forward(x, train=train)
        self._last_output_shape = logits.shape
        return logits

    def backward(self, dlogits):
        """Accumulate every parameter's gradient; fire grad-ready hooks, last layer first.

        Parameters
        ----------
        dlogits : ndarray of shape (N, num_classes), float32
            Gradient of the loss with respect to the last `forward`'s output.

        Returns
        -------
        dx : ndarray of shape (N, C, H, W), float32, or None
            None unless ``compute_input_grad`` is set.
        """
        if self._last_output_shape is None:
            raise RuntimeError(f"model {self.name!r}: backward called before forward")
        if not isinstance(dlogits, np.ndarray) or dlogits.shape != self._last_output_shape:
            got = dlogits.shape if isinstance(dlogits, np.ndarray) else type(dlogits).__name__
            raise ValueError(
                f"model {self.name!r}: expected dlogits of shape {self._last_output_shape}, got {got}"
            )
        dlogits = np.ascontiguousarray(dlogits, dtype=np.float32)
        return super().backward(dlogits)

    def zero_grad(self):
        for p in self._params:
            p.grad.fill(0.0)

    def register_grad_ready_hook(self, fn):
        """Call ``fn(i, layer)`` right after ``model.layers[i]``'s backward.

        At that moment the layer's gradients are final for this backward (each
        layer runs backward exactly once). Hooks fire in decreasing ``i``.
        """
        self.dispatcher.grad_ready_hooks.append(fn)
        return HookHandle(self.dispatcher.grad_ready_hooks, fn)

    def register_pre_forward_hook(self, fn):
        """Call ``fn(i, layer)`` just before ``model.layers[i]``'s forward (increasing ``i``).

        The engine waits here for the layer's updated parameters to arrive.
        """
        self.dispatcher.pre_forward_hooks.append(fn)
        return HookHandle(self.dispatcher.pre_forward_hooks, fn)

    # -- state dict -------------------------------------------------------------
    @staticmethod
    def _buffer_array(leaf, attr):
        value = getattr(leaf, attr)
        return value if isinstance(value, np.ndarray) else np.asarray(value)

    def state_dict(self, copy=True):
        """Parameters and buffers by torchvision name, in PyTorch's order.

        Parameters
        ----------
        copy : bool
            Return copies (default; safe to keep as a checkpoint). ``False``
            returns the live arrays, as PyTorch does.
        """
        state = {}
        for key, leaf, attr, param in self._state:
            array = param.data if param is not None else self._buffer_array(leaf, attr)
            state[key] = array.copy() if copy else array
        return state

    def load_state_dict(self, state, strict=True):
        """Copy ``state`` into the model's existing arrays (never rebinds ``.data``).

        Parameters
        ----------
        state : mapping of str -> array-like
            Numpy arrays, or anything ``np.asarray`` takes; PyTorch tensors are
            accepted too (e.g. torchvision weights).
        strict : bool
            If True, missing and unexpected keys are errors. Shape mismatches are
            always errors. Nothing is written unless the whole check passes.

        Returns
        -------
        IncompatibleKeys(missing_keys, unexpected_keys)

        Raises
        ------
        StateDictError
            Listing every missing key, unexpected key and shape mismatch.
        """
        targets = {}
        for key, leaf, attr, param in self._state:
            targets[key] = (leaf, attr, param)
        missing = [key for key in targets if key not in state]
        unexpected = [key for key in state if key not in targets]
        values, mismatched = {}, []
        for key, (leaf, attr, param) in targets.items():
            if key not in state:
                continue
            value = _to_numpy(state[key])
            expected = param.data.shape if param is not None else self._buffer_array(leaf, attr).shape
            if value.shape != expected:
                mismatched.append((key, tuple(expected), tuple(value.shape)))
            values[key] = value
        if mismatched or (strict and (missing or unexpected)):
            raise StateDictError(self.name, missing, unexpected, mismatched)
        for key, value in values.items():
            leaf, attr, param = targets[key]
            if param is not None:
                np.copyto(param.data, value, casting="unsafe")
            else:
                current = getattr(leaf, attr)
                if isinstance(current, np.ndarray):
                    np.copyto(current, value, casting="unsafe")
                else:  # a Python scalar buffer (e.g. an int counter)
                    setattr(leaf, attr, type(current)(value))
        return IncompatibleKeys(missing, unexpected)

    # -- profiling ----------------------------------------------------------------
    @contextmanager
    def profile(self):
        """Record per-leaf forward/backward wall time while the block runs.

        Yields a dict ``qualified_name -> [forward_s, backward_s, calls]`` (leaves
        only: time spent in the residual additions is not attributed).
        """
        timings = {}
        self.dispatcher.timings = timings
        try:
            yield timings
        finally:
            self.dispatcher.timings = None

    def leaves(self):
        """``(qualified_name, leaf)`` for every leaf layer (with or without parameters)."""
        return list(self.walk())

    def __repr__(self):
        return f"{self.name} ({self.num_parameters():,} parameters) " + super().__repr__()


def _to_numpy(value):
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)
