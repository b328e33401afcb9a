"""Losses: forward(prediction, target) -> float, backward() -> d prediction.

Both average over the batch (torch's reduction="mean").
"""

import numpy as np


class SoftmaxCrossEntropy:
    """Softmax followed by the negative log-likelihood, averaged over N.

    loss = mean_n( logsumexp(z_n) - z_n[label_n] ),
    dloss/dz = (softmax(z) - onehot(label)) / N.
    """

    def __init__(self):
        self._probs = None
        self._labels = None

    def __repr__(self):
        return "SoftmaxCrossEntropy()"

    def forward(self, logits, labels):
        """
        Parameters
        ----------
        logits : ndarray of shape (N, K), float32
        labels : ndarray of shape (N,), integer in [0, K)

        Returns
        -------
        loss : float
        """
        if not isinstance(logits, np.ndarray) or logits.ndim != 2 or logits.dtype != np.float32:
            raise ValueError(f"{self}: expected float32 logits of shape (N, K), got "
                             f"{getattr(logits, 'shape', type(logits).__name__)} "
                             f"{getattr(logits, 'dtype', '')}")
        labels = np.asarray(labels)
        n, k = logits.shape
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{self}: expected integer labels of shape ({n},), got "
                             f"{labels.shape} {labels.dtype}")
        if n == 0 or labels.min() < 0 or labels.max() >= k:
            raise ValueError(f"{self}: labels must lie in [0, {k}) and N must be > 0")
        shifted = logits - logits.max(axis=1, keepdims=True)  # exp cannot overflow
        exp = np.exp(shifted)
        total = exp.sum(axis=1, keepdims=True)
        self._probs = exp / total
        self._labels = labels
        log_likelihood = shifted[np.arange(n), labels] - np.log(total[:, 0])
        return float(-log_likelihood.mean(dtype=np.float64))

    def backward(self):
        """dlogits : ndarray of shape (N, K), float32."""
        if self._probs is None:
            raise RuntimeError(f"{self}: backward called before forward")
        n = self._probs.shape[0]
        dlogits = self._probs.copy()
        dlogits[np.arange(n), self._labels] -= 1.0
        dlogits /= np.float32(n)
        return dlogits


class MSELoss:
    """Mean squared error over all elements: mean((prediction - target)**2)."""

    def __init__(self):
        self._diff = None

    def __repr__(self):
        return "MSELoss()"

    def forward(self, prediction, target):
        """
        Parameters
        ----------
        prediction : ndarray, float32
        target : ndarray of the same shape

        Returns
        -------
        loss : float
        """
        if not isinstance(prediction, np.ndarray) or prediction.dtype != np.float32:
            raise ValueError(f"{self}: expected a float32 prediction array")
        target = np.asarray(target)
        if target.shape != prediction.shape or prediction.size == 0:
            raise ValueError(f"{self}: target shape {target.shape} must equal prediction "
                             f"shape {prediction.shape} (non-empty)")
        self._diff = prediction - target.astype(np.float32)
        return float(np.mean(np.square(self._diff, dtype=np.float64)))

    def backward(self):
        """d prediction : ndarray of the prediction's shape, float32."""
        if self._diff is None:
            raise RuntimeError(f"{self}: backward called before forward")
        return self._diff * np.float32(2.0 / self._diff.size)
