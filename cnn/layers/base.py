"""Parameter, the Layer base class, input checks and shared scratch buffers."""

import numpy as np

# Kernel options shared by every numba kernel in cnn/layers: nogil because a
# communication thread runs alongside; fastmath off so results match the
# numpy references to float32 rounding. The one exception is the row-sum
# helpers of batch norm and conv (REDUCTION_OPTIONS there): they allow
# reassociation ("reassoc" only) so LLVM vectorises the sums; the order is
# fixed at compile time, so runs stay bit-identical.
NUMBA_OPTIONS = {"parallel": True, "nogil": True, "cache": True, "fastmath": False}


class Parameter:
    """A trainable array and its gradient.

    Parameters
    ----------
    name : str
        Torchvision-style name; a model renames it (``features.0.weight``).
    data : ndarray, float32
        Initial value; copied into a C-contiguous float32 array.

    Notes
    -----
    ``data`` and ``grad`` are never rebound: optimizers and the engine update
    them in place (also through ``data.reshape(-1)[a:b]`` slices), and backward
    accumulates into ``grad`` with ``+=``.
    """

    def __init__(self, name, data):
        self.name = name
        self.data = np.array(data, dtype=np.float32, order="C", copy=True)
        self.grad = np.zeros_like(self.data)

    @property
    def shape(self):
        return self.data.shape

    def __repr__(self):
        return f"Parameter({self.name!r}, shape={self.data.shape})"


class Layer:
    """Base of the leaf layers.

    ``forward(x, train=True)`` keeps on the instance what ``backward`` needs
    (references, not copies: do not modify a layer's input or output in place
    before its backward). ``backward(dy)`` accumulates parameter gradients and
    returns dx.
    """

    #: Route forward/backward through the plain-numpy references.
    reference = False

    def __init__(self):
        self.params = []

    def forward(self, x, train=True):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def zero_grad(self):
        for p in self.params:
            p.grad.fill(0.0)

    def __call__(self, x, train=True):
        return self.forward(x, train)

    # -- helpers for subclasses -------------------------------------------
    def _check_input(self, x, ndim=None, channels=None, layout="(N, C, H, W)", min_ndim=1):
        """Validate a forward input and return it C-contiguous.

        ndim=None accepts any number of axes from `min_ndim` on.
        """
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{self}: expected a numpy array {layout}, got {type(x).__name__}")
        if (x.ndim != ndim) if ndim is not None else (x.ndim < min_ndim):
            raise ValueError(f"{self}: expected input of shape {layout}, got shape {x.shape}")
        if channels is not None and x.shape[1] != channels:
            raise ValueError(
                f"{self}: expected input of shape {layout} with {channels} channels "
                f"(axis 1), got shape {x.shape}"
            )
        if x.dtype != np.float32:
            raise ValueError(f"{self}: expected float32 input, got {x.dtype}")
        if min(x.shape, default=1) == 0:
            raise ValueError(f"{self}: empty input of shape {x.shape}")
        return np.ascontiguousarray(x)

    def _check_grad(self, dy, shape):
        """Validate an output gradient against the forward output shape."""
        if shape is None:
            raise RuntimeError(f"{self}: backward called before forward")
        if not isinstance(dy, np.ndarray) or dy.shape != tuple(shape):
            got = dy.shape if isinstance(dy, np.ndarray) else type(dy).__name__
            raise ValueError(f"{self}: expected gradient of shape {tuple(shape)}, got {got}")
        if dy.dtype != np.float32:
            raise ValueError(f"{self}: expected float32 gradient, got {dy.dtype}")
        return np.ascontiguousarray(dy)


def pair(value, what):
    """(h, w) from an int or a pair of ints."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{what} must be an int or a pair, got {value!r}")
        h, w = value
    else:
        h = w = value
    return int(h), int(w)


def output_size(size, kernel, stride, padding):
    """Output length of a sliding window: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


_scratch = {}


def scratch(name, shape):
    """A float32 buffer of `shape`, shared by all layers under `name`.

    Only for values that live within one forward or backward call (layers run
    one at a time), so the big im2col-sized temporaries are allocated once per
    process, not once per call or per layer. Contents are undefined.
    """
    size = int(np.prod(shape))
    buf = _scratch.get(name)
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype=np.float32)
        _scratch[name] = buf
    return buf[:size].reshape(shape)
