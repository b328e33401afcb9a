"""AdaptiveAvgPool2d: average pooling to a fixed output size, as in torchvision's VGG.

It lives here, beside the architectures that need it, because only torchvision's
VGG uses it (``avgpool = AdaptiveAvgPool2d((7, 7))``); at the 224 x 224 input
the feature map is already 7 x 7 and the layer is the identity.

Output cell ``(i, j)`` averages the input rows ``floor(i * H / H_out)`` to
``ceil((i + 1) * H / H_out)`` (exclusive) and likewise the columns, PyTorch's
definition; bins may overlap when ``H`` is not a multiple of ``H_out``.
"""

import numpy as np

from cnn.layers import Layer

__all__ = ["AdaptiveAvgPool2d"]


def _bins(size, out_size):
    """(start, stop) of each of the `out_size` adaptive bins over `size` positions."""
    return [((i * size) // out_size, -(-((i + 1) * size) // out_size)) for i in range(out_size)]


class AdaptiveAvgPool2d(Layer):
    """Average pooling to ``output_size``, whatever the input's spatial size.

    Parameters
    ----------
    output_size : int or (int, int)
    """

    def __init__(self, output_size):
        super().__init__()
        if isinstance(output_size, (tuple, list)):
            self.output_size = (int(output_size[0]), int(output_size[1]))
        else:
            self.output_size = (int(output_size), int(output_size))
        self._x_shape = None

    def __repr__(self):
        return f"AdaptiveAvgPool2d(output_size={self.output_size})"

    def forward(self, x, train=True):
        """x : ndarray of shape (N, C, H, W), float32 -> (N, C, H_out, W_out)."""
        x = self._check_input(x, 4)
        self._x_shape = x.shape
        n, c, h, w = x.shape
        h_out, w_out = self.output_size
        if (h, w) == (h_out, w_out):
            return x
        if h % h_out == 0 and w % w_out == 0:  # equal, disjoint bins
            kh, kw = h // h_out, w // w_out
            return x.reshape(n, c, h_out, kh, w_out, kw).mean(axis=(3, 5), dtype=np.float32)
        y = np.empty((n, c, h_out, w_out), dtype=np.float32)
        for i, (r0, r1) in enumerate(_bins(h, h_out)):
            for j, (c0, c1) in enumerate(_bins(w, w_out)):
                y[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3), dtype=np.float32)
        return y

    def backward(self, dy):
        """dy : ndarray of shape (N, C, H_out, W_out) -> dx (N, C, H, W)."""
        n, c, h, w = self._x_shape if self._x_shape is not None else (0, 0, 0, 0)
        h_out, w_out = self.output_size
        dy = self._check_grad(dy, None if self._x_shape is None else (n, c, h_out, w_out))
        if (h, w) == (h_out, w_out):
            return dy
        if h % h_out == 0 and w % w_out == 0:
            kh, kw = h // h_out, w // w_out
            dx = np.broadcast_to((dy / np.float32(kh * kw))[:, :, :, None, :, None],
                                 (n, c, h_out, kh, w_out, kw))
            return np.ascontiguousarray(dx).reshape(n, c, h, w)
        dx = np.zeros((n, c, h, w), dtype=np.float32)
        for i, (r0, r1) in enumerate(_bins(h, h_out)):
            for j, (c0, c1) in enumerate(_bins(w, w_out)):
                area = np.float32((r1 - r0) * (c1 - c0))
                dx[:, :, r0:r1, c0:c1] += (dy[:, :, i, j] / area)[:, :, None, None]
        return dx
