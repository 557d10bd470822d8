"""Standard errors, one definition each: of an accuracy (a proportion) and of a mean of per-image values."""

import math

import torch


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n test images: sqrt(a (1 - a) / n)."""
    if n < 1:
        raise ValueError(f"an accuracy needs at least one test image, got n = {n}")
    return math.sqrt(accuracy * (1 - accuracy) / n)


def mean_and_se(values) -> dict:
    """{"mean", "se"} of per-image values (n,): their mean and its standard error, the sample
    standard deviation (n - 1 in the denominator) over sqrt(n). NaN for one value: a single
    image says nothing of the spread."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return {"mean": float(v.mean()), "se": se}
