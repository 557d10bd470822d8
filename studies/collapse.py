"""Collapse and its safeguards: the measurements of notebooks/Failure_Modes.ipynb.

The runs themselves are made by benchmarks/collapse.py (the demo recipe with one safeguard
changed at a time); this file reads their logs and probes, and holds the controls of the
concat-4 claim. Each function is tested on hand-made inputs in tests/test_analysis.py.
"""

import math

import numpy as np


def student_grad_norm(row: dict) -> float:
    """The gradient norm of the whole student encoder, from a log row's per-block norms."""
    return math.sqrt(sum(v * v for k, v in row["grad_norms"].items() if k.startswith("student.")))


def series(log: list, key, until: int | None = None) -> tuple:
    """(steps, values) of a log: `key` a row field or a function of the row; rows up to step `until`."""
    rows = [r for r in log if until is None or r["step"] <= until]
    get = key if callable(key) else (lambda r: r[key])
    return np.array([r["step"] for r in rows]), np.array([get(r) for r in rows], dtype=float)


def largest_jump(values) -> float:
    """The largest factor between consecutive values, up or down: max over t of
    max(v[t+1] / v[t], v[t] / v[t+1]), for positive values. 1 for a flat series; a curve that
    doubles or halves from one logged row to the next scores 2."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2 or (v <= 0).any():
        raise ValueError("largest_jump needs at least two positive values")
    ratio = v[1:] / v[:-1]
    return float(np.maximum(ratio, 1 / ratio).max())


def first_row(log: list, condition) -> dict | None:
    """The first logged row for which `condition(row)` holds (e.g. train.collapse_warning), or None."""
    return next((row for row in log if condition(row)), None)


def falls_before(steps, values, at_step: int, window: int) -> float:
    """How much a curve fell in the `window` steps before `at_step`: its value at the start of the
    window over its value at `at_step` (the nearest logged rows at or before each). Above 1: it fell."""
    steps, values = np.asarray(steps), np.asarray(values, dtype=float)
    end = np.searchsorted(steps, at_step, side="right") - 1
    start = np.searchsorted(steps, at_step - window, side="right") - 1
    if start < 0 or end <= start:
        raise ValueError(f"no logged rows {window} steps before step {at_step}")
    return float(values[start] / values[end])


# -----------------------------------------------------------------------------------------------
# Claim 5: does concat-4 beat the last layer only because it is four times as wide? Two controls
# of equal width: concat-4 squeezed to one layer's width, and one layer lifted to concat-4's.


def random_projection(x: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """x (N, D) -> (N, dim) through a fixed Gaussian matrix (D, dim) scaled by 1 / sqrt(dim): a
    linear map of the same information into `dim` columns (with dim < D some of it is lost)."""
    w = np.random.default_rng(seed).standard_normal((x.shape[1], dim)) / math.sqrt(dim)
    return (x @ w).astype(np.float32)


def random_features(train: np.ndarray, test: np.ndarray, dim: int, seed: int = 0) -> tuple:
    """Random ReLU features of a training and a test set, (N, D) -> (N, dim) each: columns
    standardised with the training set's mean and spread, then relu(x W + b) with a fixed Gaussian
    W (D, dim) / sqrt(D) and b ~ N(0, 1). Wider than x and non-linear, so a linear probe on them can
    separate what one on x cannot: the width concat-4 has, without its other layers."""
    rng = np.random.default_rng(seed)
    mean, spread = train.mean(0), train.std(0) + 1e-8
    w = rng.standard_normal((train.shape[1], dim)) / math.sqrt(train.shape[1])
    b = rng.standard_normal(dim)
    return tuple(np.maximum((x - mean) / spread @ w + b, 0).astype(np.float32) for x in (train, test))
