"""Standard errors, one definition each (of an accuracy, of a mean of per-image values, and by the
bootstrap of any statistic of images), and the one rule every verdict of the project uses to
compare two measurements."""

import math
from dataclasses import dataclass

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


def bootstrap_se(statistic, rows: torch.Tensor, resamples: int = 100, seed: int = 0) -> float:
    """The standard error of statistic(rows) over the sampling of its rows (images): the standard
    deviation of the statistic over `resamples` resamplings of the rows with replacement."""
    if len(rows) < 2 or resamples < 2:
        raise ValueError(f"the bootstrap needs at least 2 rows and 2 resamples, got {len(rows)} and {resamples}")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(rows), (resamples, len(rows)), generator=g)
    return float(torch.tensor([statistic(rows[pick]) for pick in picks], dtype=torch.float64).std())


@dataclass(frozen=True)
class Difference:
    """a - b for two measurements, in their units and in standard errors of the difference."""

    a: float
    b: float
    diff: float  # a - b
    se: float  # the standard error of a - b
    z: float  # diff / se: how many standard errors apart (+-inf when se is 0 and they differ)
    verdict: str  # "better", "worse" (a against b) or "no difference" (|z| below the threshold)

    def sentence(self, name_a: str, name_b: str, digits: int = 3, points: bool = False) -> str:
        """One line: 'teacher 0.669 vs pixels 0.465: +0.204 (+13.3 s.e.), teacher better'; with
        points=True (accuracies) the difference is in percentage points: '+20.4 points'."""
        said = {"better": f"{name_a} better", "worse": f"{name_a} worse",
                "no difference": "no difference the measurement resolves"}[self.verdict]
        diff = f"{100 * self.diff:+.1f} points" if points else f"{self.diff:+.{digits}f}"
        return f"{name_a} {self.a:.{digits}f} vs {name_b} {self.b:.{digits}f}: {diff} ({self.z:+.1f} s.e.), {said}"


def compare(a: float, se_a: float, b: float, se_b: float, higher_is_better: bool = True,
            threshold: float = 2.0, min_se: float = 0.0) -> Difference:
    """The project's rule for 'a differs from b': a - b counts when it is at least `threshold`
    standard errors of the difference from 0, the two measurements taken as independent
    (se = sqrt(se_a^2 + se_b^2)). `min_se` is a floor on that se: an accuracy of 1.0 or 0.0 has a
    binomial standard error of 0, which would make any difference infinitely sure (a floor of
    0.5 / n_test says one image's worth is the least a test set can resolve)."""
    for name, value in (("a", a), ("b", b), ("se_a", se_a), ("se_b", se_b)):
        if not math.isfinite(value):
            raise ValueError(f"compare needs finite numbers, got {name} = {value}: a NaN standard error "
                             f"comes from a single measurement, which says nothing of the spread")
    if se_a < 0 or se_b < 0:
        raise ValueError(f"standard errors are never negative, got {se_a} and {se_b}")
    diff = a - b
    se = max(math.hypot(se_a, se_b), min_se)
    z = diff / se if se > 0 else (math.copysign(math.inf, diff) if diff else 0.0)
    ahead = diff > 0 if higher_is_better else diff < 0
    verdict = "no difference" if abs(z) < threshold else "better" if ahead else "worse"
    return Difference(a, b, diff, se, z, verdict)


def seeds_agree(per_seed: list) -> str:
    """The study rule over seeds: a verdict ("better", "worse") counts only when it is the same on
    every seed and there are at least two; anything else is "no difference the seeds agree on"."""
    said = {d.verdict for d in per_seed}
    return said.pop() if len(said) == 1 and len(per_seed) >= 2 and "no difference" not in said else \
        "no difference the seeds agree on"
