"""Calibration and sharpness of probability forecasts.

Reliability bins: forecasts q fall into equal-width bins over [0, 1] (1.0 goes in the last bin); per bin, the mean
forecast against the observed frequency, the mean of the targets (0/1 outcomes, or probabilities when scoring
against a market or p*).

    ECE        = sum_b (n_b / N) |mean q_b - mean y_b|     0 for a calibrated forecaster
    sharpness  = mean |q - 0.5|                            0 for always 0.5, 0.5 for only 0s and 1s

Calibration alone is cheap (always answering the base rate is calibrated), so ECE is read beside sharpness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Reliability:
    edges: np.ndarray  # [bins + 1]
    count: np.ndarray  # [bins]
    mean_forecast: np.ndarray  # [bins], NaN where empty
    observed: np.ndarray  # [bins], NaN where empty

    @property
    def ece(self) -> float:
        n = self.count.sum()
        if n == 0:
            return float("nan")
        full = self.count > 0
        return float(np.sum(self.count[full] * np.abs(self.mean_forecast[full] - self.observed[full])) / n)


def _pair(q, y) -> tuple[np.ndarray, np.ndarray]:
    q, y = np.asarray(q, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if q.shape != y.shape:
        raise ValueError(f"{q.size} forecasts but {y.size} targets")
    if np.any((q < 0) | (q > 1)):
        raise ValueError("forecasts must lie in [0, 1]")
    return q, y


def reliability(q, y, bins: int = 10) -> Reliability:
    """Forecasts q against targets y; pairs where either is NaN are left out."""
    q, y = _pair(q, y)
    keep = ~(np.isnan(q) | np.isnan(y))
    q, y = q[keep], y[keep]
    edges = np.arange(bins + 1) / bins  # k / bins, so a forecast of exactly 0.3 opens the [0.3, 0.4) bin
    idx = np.digitize(q, edges[1:-1])
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_q = np.bincount(idx, weights=q, minlength=bins) / count
        obs = np.bincount(idx, weights=y, minlength=bins) / count
    return Reliability(edges, count, mean_q, obs)


def ece(q, y, bins: int = 10) -> float:
    return reliability(q, y, bins).ece


def sharpness(q) -> float:
    q = np.asarray(q, dtype=np.float64).ravel()
    q = q[~np.isnan(q)]
    return float(np.abs(q - 0.5).mean()) if q.size else float("nan")
