"""Temperature scaling (Guo et al. 2017): one scalar T fitted on held-out logits so that
softmax(logits / T) is calibrated; the argmax, and so accuracy, does not change."""

from __future__ import annotations

import numpy as np
import torch


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, bounds: tuple[float, float] = (
        0.05, 20.0)) -> float:
    """The temperature minimising the negative log-likelihood of ``labels``, within ``bounds``
    and always finite: rows with non-finite logits are left out (1.0 when none is left)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    finite = np.isfinite(logits).all(axis=1) if logits.ndim == 2 else np.zeros(0, bool)
    if len(labels) == 0 or not finite.any():
        return 1.0
    z = torch.as_tensor(logits[finite])
    y = torch.as_tensor(labels[finite])
    low, high = np.log(bounds[0]), np.log(bounds[1])
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        # Clamped inside the objective: the line search can step log T far out, where
        # exp(log T) under- or overflows and the loss (and so T) becomes NaN.
        loss = torch.nn.functional.cross_entropy(z / log_t.clamp(low, high).exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    value = float(np.exp(np.clip(log_t.item(), low, high)))
    return value if np.isfinite(value) else 1.0


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10
                               ) -> float:
    """Confidence-binned |accuracy - confidence|, weighted by bin size."""
    if len(labels) == 0:
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()) if len(labels) else 0.0
