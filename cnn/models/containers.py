"""Composite layers: `Sequential`, the residual blocks, and the hook dispatcher.

A container owns named children (leaf layers from `cnn.layers` or other
containers) and wires their ``forward``/``backward`` together. It never calls a
child directly: every call goes through a `Dispatcher`, which is how the model
fires the contract's hooks (``pre_forward`` just before a parameter layer's
forward, ``grad_ready`` right after its backward) without the leaf layers
knowing anything about hooks.

Why the gradient of a layer is final right after its own backward: every layer
object appears exactly once in the forward graph (every ReLU of a model is its
own object, or fused into the BatchNorm2d before it), so its ``backward`` runs
exactly once per ``model.backward`` and nothing accumulates into its ``.grad``
afterwards.
"""

import time

from cnn.layers import BatchNorm2d, Conv2D, ReLU
from cnn.layers.activation import add_into

__all__ = ["BasicBlock", "Bottleneck", "Container", "Dispatcher", "Sequential"]


class Dispatcher:
    """Runs a child layer's forward/backward and fires the model's hooks.

    One dispatcher is shared by every container of a model. Containers that are
    not (yet) part of a model use a private dispatcher with no hooks.

    Attributes
    ----------
    index : dict of int -> int
        ``id(layer) -> i`` for the parameter-owning leaf layers (``model.layers[i]``).
    names : dict of int -> str
        ``id(layer) -> qualified name`` for every leaf (used by the profiler).
    timings : dict of str -> list [forward_s, backward_s, calls] or None
        Per-leaf wall time, recorded only while not None (`Model.profile`).
    """

    def __init__(self):
        self.index = {}
        self.names = {}
        self.pre_forward_hooks = []
        self.grad_ready_hooks = []
        self.timings = None

    def forward(self, layer, x, train, **extra):
        """layer.forward(x, train=train, **extra); extra: keyword inputs such as
        the residual of `ReLU.forward`."""
        if isinstance(layer, Container):
            return layer.forward(x, train=train)
        i = self.index.get(id(layer))
        if i is not None:
            for fn in self.pre_forward_hooks:
                fn(i, layer)
        if self.timings is None:
            return layer.forward(x, train=train, **extra)
        start = time.perf_counter()
        y = layer.forward(x, train=train, **extra)
        self._record(layer, 0, time.perf_counter() - start)
        return y

    def backward(self, layer, dy):
        if isinstance(layer, Container):
            return layer.backward(dy)
        if self.timings is None:
            dx = layer.backward(dy)
        else:
            start = time.perf_counter()
            dx = layer.backward(dy)
            self._record(layer, 1, time.perf_counter() - start)
        i = self.index.get(id(layer))
        if i is not None:
            for fn in self.grad_ready_hooks:
                fn(i, layer)
        return dx

    def _record(self, layer, phase, seconds):
        name = self.names.get(id(layer), type(layer).__name__)
        entry = self.timings.setdefault(name, [0.0, 0.0, 0])
        entry[phase] += seconds
        entry[2] += phase == 0


class Container:
    """Base of composite layers: an ordered list of named children.

    Children are exposed as attributes too (``block.conv1``), and their names
    become the components of the parameter names (``layer1.0.conv1.weight``).
    A container has the leaf-layer interface (``params``, ``forward``,
    ``backward``, ``zero_grad``), so containers nest.
    """

    def __init__(self):
        self._children = []
        self.dispatcher = Dispatcher()

    def add(self, name, layer):
        """Append child ``layer`` under ``name`` (a state_dict path component)."""
        name = str(name)
        if any(name == existing for existing, _ in self._children):
            raise ValueError(f"duplicate child name {name!r}")
        self._children.append((name, layer))
        if name.isidentifier():
            setattr(self, name, layer)
        return layer

    def named_children(self):
        return list(self._children)

    def walk(self, prefix=""):
        """Yield ``(qualified_name, leaf_layer)`` for every leaf, in forward order."""
        for name, child in self._children:
            path = f"{prefix}{name}"
            if isinstance(child, Container):
                yield from child.walk(path + ".")
            else:
                yield path, child

    def containers(self):
        """Yield this container and every nested container."""
        yield self
        for _, child in self._children:
            if isinstance(child, Container):
                yield from child.containers()

    @property
    def params(self):
        return [p for _, leaf in self.walk() for p in leaf.params]

    def zero_grad(self):
        for p in self.params:
            p.grad.fill(0)

    def _forward(self, layer, x, train, **extra):
        return self.dispatcher.forward(layer, x, train, **extra)

    def _backward(self, layer, dy):
        return self.dispatcher.backward(layer, dy)

    def __repr__(self):
        lines = [f"{type(self).__name__}("]
        for name, child in self._children:
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"


class Sequential(Container):
    """Children applied one after the other; backward in reverse order.

    Parameters
    ----------
    *layers : layers, or ``(name, layer)`` pairs
        Unnamed layers are named by position ``"0", "1", ...`` like
        ``torch.nn.Sequential`` (hence torchvision's ``features.0.weight``).
    """

    def __init__(self, *layers):
        super().__init__()
        for position, item in enumerate(layers):
            if isinstance(item, tuple):
                self.add(*item)
            else:
                self.add(str(position), item)

    def __len__(self):
        return len(self._children)

    def __getitem__(self, position):
        return self._children[position][1]

    def forward(self, x, train=True):
        for _, layer in self._children:
            x = self._forward(layer, x, train)
        return x

    def backward(self, dy):
        for _, layer in reversed(self._children):
            dy = self._backward(layer, dy)
        return dy


class _ResidualBlock(Container):
    """``y = relu(main(x) + shortcut(x))`` with the residual addition's backward.

    Subclasses register the main-branch children (in forward order) in
    ``self.main`` and, when the shape changes, a ``downsample`` Sequential. The
    gradient of an addition is the upstream gradient, passed unchanged to both
    branches; the block's input gradient is the sum of the two branches'.

    Backward runs in exact reverse forward order (torchvision's forward computes
    the main branch, then ``downsample``), so grad-ready hooks fire strictly
    last layer first: ``downsample`` first, then the main branch from its end.
    """

    def __init__(self):
        super().__init__()
        self.main = []
        self.downsample = None

    def _finish(self, downsample):
        if downsample is not None:
            self.add("downsample", downsample)
        # Its own ReLU object (each one keeps its own mask), which also does the
        # addition: relu_out(main, residual=shortcut). A BatchNorm2d without a
        # fused ReLU keeps its input, not its output, so the sum can overwrite
        # the main branch's output.
        last = self.main[-1]
        self.relu_out = ReLU(inplace=isinstance(last, BatchNorm2d) and not last.relu)
        self.add("relu_out", self.relu_out)

    def forward(self, x, train=True):
        out = x
        for layer in self.main:
            out = self._forward(layer, out, train)
        shortcut = x if self.downsample is None else self._forward(self.downsample, x, train)
        return self._forward(self.relu_out, out, train, residual=shortcut)

    def backward(self, dy):
        dy = self._backward(self.relu_out, dy)  # gradient of the sum
        if self.downsample is None:
            dx_shortcut = dy
        else:
            dx_shortcut = self._backward(self.downsample, dy)
        dx = dy
        for layer in reversed(self.main):
            dx = self._backward(layer, dx)
        if dx is None or dx_shortcut is None:  # first layer of a model: no input gradient wanted
            return None
        if isinstance(self.main[0], Conv2D):
            # Conv2D returns a fresh dx that nothing else holds: add in place
            add_into(dx.reshape(-1), dx_shortcut.reshape(-1))
            return dx
        return dx + dx_shortcut


def _projection(in_channels, out_channels, stride, rng):
    """Option-B shortcut: 1x1 convolution (stride s) + BatchNorm, torchvision names 0, 1."""
    return Sequential(
        Conv2D(in_channels, out_channels, 1, stride=stride, bias=False, rng=rng),
        BatchNorm2d(out_channels),
    )


class BasicBlock(_ResidualBlock):
    """Two 3x3 convolutions (He et al. 2016, Fig. 2 left); ``expansion = 1``.

    ``conv1 (3x3, stride) -> bn1 + relu -> conv2 (3x3) -> bn2``, plus the
    shortcut, then ReLU (``bn1`` is a `BatchNorm2d` with its ReLU fused in:
    torchvision's ``relu`` module has no separate leaf here). The shortcut is
    the identity when the shape is kept and a projection (1x1 conv + BN,
    "option B") when it changes.

    Parameters
    ----------
    in_channels, channels : int
    stride : int
        Stride of ``conv1`` and of the projection; output size
        ``H_out = (H + 2 * 1 - 3) // stride + 1``.
    rng : numpy.random.Generator
    """

    expansion = 1

    def __init__(self, in_channels, channels, stride=1, rng=None):
        super().__init__()
        self.main = [
            self.add("conv1", Conv2D(in_channels, channels, 3, stride=stride, padding=1, bias=False,
                                     rng=rng)),
            self.add("bn1", BatchNorm2d(channels, relu=True)),
            self.add("conv2", Conv2D(channels, channels, 3, stride=1, padding=1, bias=False, rng=rng)),
            self.add("bn2", BatchNorm2d(channels)),
        ]
        needs_projection = stride != 1 or in_channels != channels
        self._finish(_projection(in_channels, channels, stride, rng) if needs_projection else None)


class Bottleneck(_ResidualBlock):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), torchvision's ResNet v1.5.

    The stride sits on the 3x3 convolution (v1.5), not on the first 1x1 (v1,
    He et al. 2016): same parameters, about 0.5 % better top-1 on ImageNet.

    Parameters
    ----------
    in_channels : int
    width : int
        Channels of the 3x3 convolution; the block outputs ``4 * width``.
    stride : int
    rng : numpy.random.Generator
    """

    expansion = 4

    def __init__(self, in_channels, width, stride=1, rng=None):
        super().__init__()
        out_channels = width * self.expansion
        self.main = [
            self.add("conv1", Conv2D(in_channels, width, 1, bias=False, rng=rng)),
            self.add("bn1", BatchNorm2d(width, relu=True)),
            self.add("conv2", Conv2D(width, width, 3, stride=stride, padding=1, bias=False, rng=rng)),
            self.add("bn2", BatchNorm2d(width, relu=True)),
            self.add("conv3", Conv2D(width, out_channels, 1, bias=False, rng=rng)),
            self.add("bn3", BatchNorm2d(out_channels)),
        ]
        needs_projection = stride != 1 or in_channels != out_channels
        self._finish(_projection(in_channels, out_channels, stride, rng) if needs_projection else None)
