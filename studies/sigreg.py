"""A JEPA kept from collapse by SIGReg instead of an EMA teacher (LeJEPA, Balestriero & LeCun,
arXiv 2511.08544; with latent prediction and no EMA, LeWorldModel, arXiv 2603.19312).

I-JEPA avoids the trivial solution (every image -> one constant feature, which predicts itself
perfectly) with an asymmetry: targets come from a slowly moving teacher and no gradient flows
into them. SIGReg removes the asymmetry and forbids the trivial solution instead: the encoder's
embeddings are pushed towards an isotropic Gaussian, a distribution that cannot be a point.

*Sketched Isotropic Gaussian Regularisation.* A D-dimensional distribution is a standard normal
N(0, I) exactly when every 1-D projection of it is N(0, 1) (Cramer-Wold), so SIGReg draws M random
unit directions, projects the N embeddings on each, and scores each projection with the
Epps-Pulley statistic: how far the projection's empirical characteristic function is from the
standard normal's, integrated with a Gaussian weight,

    EP = N * integral over t of |phi_N(t) - exp(-t^2 / 2)|^2 * exp(-t^2 / 2) dt,
    phi_N(t) = mean over the sample of exp(i t x) = mean cos(t x) + i mean sin(t x).

    train.py --method sigreg                         # --sigreg-weight 0.05, --sigreg-slices 256

The integrand is even in t, so the integral over the real line is twice the integral over
[0, inf); it is taken with the trapezoid rule on a grid of [0, 3] (the weight exp(-t^2/2) is
below 0.011 beyond 3). The loss is the mean of EP over the M directions, drawn afresh every step.

What EP measures, with numbers (tests/test_sigreg.py checks them): for N samples of N(0, 1) its
expectation is integral (1 - exp(-t^2)) exp(-t^2/2) dt, about 1.06 over the whole line and the
same for any N (the sampling noise of phi_N); a collapsed sample (all x equal to 0) scores
N * integral (1 - exp(-t^2/2))^2 exp(-t^2/2) dt, about 0.41 N. It grows with N for any
distribution other than N(0, 1), which is what makes it a test.
"""

from dataclasses import replace

import torch

import models as M
from models import sum_over_ranks

T_MAX = 3.0  # the t-grid's end: the Gaussian weight is exp(-4.5) = 0.011 there
T_POINTS = 17  # grid points on [0, T_MAX]


def trapezoid_weights(t_max: float = T_MAX, points: int = T_POINTS) -> tuple:
    """The grid t (points,) on [0, t_max] and the quadrature weights (points,) that integrate an
    even function over the whole real line: twice the trapezoid rule on [0, t_max]."""
    t = torch.linspace(0.0, t_max, points, dtype=torch.float64)
    dt = t_max / (points - 1)
    weights = torch.full((points,), 2 * dt, dtype=torch.float64)
    weights[[0, -1]] = dt  # the trapezoid's half weight at each end, doubled
    return t, weights


def epps_pulley(x: torch.Tensor, valid: torch.Tensor | None = None, t_max: float = T_MAX,
                points: int = T_POINTS) -> torch.Tensor:
    """The Epps-Pulley statistic of each column of x (N, M): (M,). `valid` (N,) bool keeps only
    some rows (padding out). Under DistributedDataParallel the characteristic function is averaged
    over the rows of every rank, so the statistic is that of the global batch, as one process
    would compute it."""
    t, weights = (v.to(x.device) for v in trapezoid_weights(t_max, points))
    gauss = torch.exp(-0.5 * t * t).float()  # (P,) the standard normal's characteristic function, also the weight
    keep = (torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if valid is None else valid)[:, None, None]
    xt = x.float()[..., None] * t.float()  # (N, M, P)
    # rows left out are selected out, not multiplied by 0: a NaN or inf in padding never gets in
    cos_sum = sum_over_ranks(torch.where(keep, torch.cos(xt), 0.0).sum(0))  # (M, P)
    sin_sum = sum_over_ranks(torch.where(keep, torch.sin(xt), 0.0).sum(0))
    n = sum_over_ranks(keep.sum().float()).clamp(min=1)
    error = (cos_sum / n - gauss) ** 2 + (sin_sum / n) ** 2  # (M, P) |phi_N(t) - phi(t)|^2
    return n * error @ (weights * gauss).float()  # (M,)


def random_directions(dim: int, count: int, generator: torch.Generator | None = None,
                      device=None) -> torch.Tensor:
    """`count` directions drawn uniformly on the unit sphere of R^dim: (dim, count), unit columns."""
    a = torch.randn(dim, count, generator=generator).to(device)
    return a / a.norm(dim=0, keepdim=True)


def sigreg(embeddings: torch.Tensor, directions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """SIGReg of embeddings (N, D) along directions (D, M): the mean Epps-Pulley statistic of the
    M projections, a scalar that is small only when the embeddings look like N(0, I)."""
    return epps_pulley(embeddings @ directions.to(embeddings.dtype), valid).mean()


SIGREG_WEIGHT = 0.05  # lambda: the loss is (1 - lambda) * prediction + lambda * SIGReg (LeJEPA's default)
SIGREG_SLICES = 256  # random directions per step


def check_settings(weight: float, slices: int) -> None:
    """Raise a ValueError naming the flag when SIGReg's weight or number of directions is impossible."""
    if not 0 <= weight <= 1:
        raise ValueError(f"--sigreg-weight must be from 0 to 1, got {weight}")
    if slices < 1:
        raise ValueError(f"--sigreg-slices must be at least 1, got {slices}")


class SIGRegJEPA(M.IJEPA):
    """I-JEPA's student, predictor and masking, with the teacher replaced by the student itself
    and SIGReg added to the loss.

    One pass of the student over the whole image (both streams, with gradients) gives two things:
    the targets (its hidden stream, after the configured feature norm, exactly as the teacher's
    would be) and the embeddings SIGReg regularises (every real token of every image, before the
    feature norm). Gradients flow through the targets too: there is no stop-gradient, and nothing
    but SIGReg stands between the model and a constant output. The directions are drawn afresh
    each step from torch's global generator, whose state the checkpoints keep, so a resumed run
    draws the same ones.

    There is no teacher. `train.py`, the checkpoints and every evaluation read a `teacher`, so it
    holds a copy of the student (`update_teacher` copies it after each step)."""

    def __init__(self, cfg: M.JEPAConfig = M.JEPAConfig(), weight: float = SIGREG_WEIGHT, slices: int = SIGREG_SLICES):
        super().__init__(cfg)
        check_settings(weight, slices)
        self.weight, self.slices = weight, slices

    def forward(self, batch: M.MaskedBatch) -> M.JEPAOutput:
        patches, pos, sample = batch.whole_images()
        whole = self.student(patches, pos, sample)  # (B, Lc + Lh, D), with gradients: no teacher
        targets = self.teacher_targets(whole, batch)  # 1. (B, Lh, D) the student's own, after the feature norm
        context = self.encode_context(batch)  # 2. (B, Lc, D)
        prediction = self.predict(context, batch)  # 3. (B, Lh, D)
        out = self.loss(prediction, targets, batch)  # 4. the prediction loss
        D = whole.shape[-1]
        directions = random_directions(D, self.slices, device=whole.device)  # (D, M), fresh each step
        regulariser = sigreg(whole.reshape(-1, D), directions, (sample >= 0).reshape(-1))
        total = (1 - self.weight) * out.loss + self.weight * regulariser
        return replace(out, loss=total, parts={"prediction": out.loss.detach(), "sigreg": regulariser.detach()})

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """No teacher: the slot holds a copy of the student, whatever the momentum."""
        self.teacher.load_state_dict(self.student.state_dict())
