"""The linear probe's solver: multinomial logistic regression with scikit-learn's objective, fitted by
preconditioned L-BFGS in torch, with its regularisation C chosen on a validation part of the
training set (`linear_probe`). `prepare_features` does the per-feature-set work once (the
standardisation and a rotation into uncorrelated coordinates), so that many labels can be probed
on the same features; `benchmarks/probe_agreement.py` checks the answers against scikit-learn."""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score


@dataclass
class ProbeResult:
    top1: float  # accuracy on the test split
    macro_f1: float
    C: float  # chosen inverse regularisation strength
    val_top1: float  # accuracy on the validation split at that C
    predictions: np.ndarray  # test predictions, for confusion matrices
    converged: bool  # False when a fit stopped before its gradient was shorter than tol


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float, max_iter: int = 1000, tol: float = 1e-4,
                 start=None):
    """Multinomial logistic regression, full batch, by L-BFGS. The objective is scikit-learn's
    (C x the summed log-loss + half the squared norm of the weights, the bias unpenalised), divided
    by the number of samples, so the minimum is the same. The search stops when the gradient's length
    is below `tol`: stricter than scikit-learn's rule (its largest component below tol, default 1e-4),
    and the same in any rotated basis of the features. `start` (weights, bias) warm-starts the search;
    the problem is convex, so the optimum does not depend on it. Returns (weights, bias, converged).

    With P the softmax probabilities and Y the one-hot labels, the gradient is
    d/dW = x^T (P - Y) / n + W / (C n) and d/db = sum over samples of (P - Y) / n.

    Preconditioning: L-BFGS walks in rescaled weights u = W sqrt(h), with h, per feature, the
    objective's curvature at the start (every class at probability 1/k): mean(x^2) / k + 1 / (C n).
    When the features are uncorrelated (prepare_features rotates them into the eigenvectors of their
    covariance) that is the whole Hessian at the start, so every direction looks alike to L-BFGS.
    Without it, a C = 10 fit on 512 correlated features took hundreds of steps; with it, tens."""
    n, d = x.shape
    curvature = torch.cat([x.pow(2).mean(0) / n_classes + 1.0 / (C * n), x.new_full((1,), 1.0 / n_classes)])
    scale = curvature.rsqrt()[:, None]  # (d + 1, 1): theta = u * scale
    theta = x.new_zeros(d + 1, n_classes)  # the weights (d rows), then the bias (one row)
    if start is not None:
        theta[:d], theta[d] = start[0], start[1]
    u = (theta / scale).requires_grad_(True)  # for the optimiser's bookkeeping; the closure sets .grad itself
    onehot = F.one_hot(y, n_classes).to(x.dtype)  # (n, k)
    penalty = 1.0 / (C * n)
    grad_norm = [math.inf]  # of the objective in W and b, at the last point evaluated

    @torch.no_grad()
    def objective():
        theta = u * scale
        W, b = theta[:d], theta[d]
        log_p = torch.addmm(b, x, W).log_softmax(1)  # (n, k)
        loss = -(log_p * onehot).sum() / n + 0.5 * penalty * (W * W).sum()
        residual = (log_p.exp() - onehot) / n  # (n, k): d loss / d logits
        grad = torch.empty_like(theta)
        torch.addmm(W, x.T, residual, beta=penalty, out=grad[:d])  # x^T residual + penalty * W
        grad[d] = residual.sum(0)
        grad_norm[0] = float(grad.norm())
        u.grad = grad * scale  # the chain rule through theta = u * scale
        return loss

    chunk = 10  # L-BFGS iterations between checks of the stopping rule (torch's own rule is a different one)
    opt = torch.optim.LBFGS([u], lr=1, max_iter=chunk, max_eval=100 * chunk, tolerance_grad=0, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")
    objective()
    steps = 0
    while grad_norm[0] > tol and steps < max_iter:
        asked = opt.param_groups[0]["max_iter"] = min(chunk, max_iter - steps)
        opt.step(objective)
        done = opt.state[u]["n_iter"] - steps
        steps += done
        objective()  # the gradient where this chunk ended
        if done < asked:  # L-BFGS stopped early: no further progress is possible in floating point
            break
    theta = (u * scale).detach()
    return theta[:d].clone(), theta[d].clone(), grad_norm[0] <= tol


@dataclass
class Basis:
    """How a feature set is shown to the logistic regression: standardised by the mean and standard
    deviation of the rows it is fitted on, then rotated into the eigenvectors of their covariance, so
    that the coordinates are uncorrelated (which makes fit_logistic's preconditioning exact at the
    start). The rotation is orthonormal, so the squared norm of the weights, and with it the
    objective and its optimum, are unchanged. With more features than rows (raw pixels) it keeps only
    the rows' span, where the L2-penalised optimum lies: each step then costs n x n, not n x d."""
    mean: torch.Tensor  # (d,)
    std: torch.Tensor  # (d,)
    rotation: torch.Tensor  # (d, r), orthonormal columns; r = min(d, n)

    @classmethod
    def from_rows(cls, x: torch.Tensor) -> tuple:
        """Rows (n, d) -> (their Basis, their coordinates (n, r))."""
        mean, std = x.mean(0), x.std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))  # constant features stay zero, as in scikit-learn
        s = (x - mean) / std  # (n, d)
        span = None
        if s.shape[1] > s.shape[0]:  # the rows' span: s^T = span @ r, span (d, n) orthonormal
            span, r = torch.linalg.qr(s.T)
            s = r.T  # (n, n): the rows in that basis
        _, eigenvectors = torch.linalg.eigh(s.T @ s)  # of the covariance (times n)
        rotation = eigenvectors if span is None else span @ eigenvectors
        return cls(mean, std, rotation), s @ eigenvectors

    def coordinates(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features (m, d) -> their coordinates (m, r)."""
        return ((x - self.mean) / self.std) @ self.rotation

    def to_features(self, W: torch.Tensor, b: torch.Tensor) -> tuple:
        """A linear map (W, b) on the coordinates -> the same map on the raw features."""
        W_raw = (self.rotation @ W) / self.std[:, None]  # (d, k)
        return W_raw, b - self.mean @ W_raw

    def from_features(self, W_raw: torch.Tensor, b_raw: torch.Tensor) -> tuple:
        """A linear map on the raw features -> the map on the coordinates that agrees with it on the
        rows' span (everywhere, when d <= n)."""
        return self.rotation.T @ (W_raw * self.std[:, None]), b_raw + self.mean @ W_raw


@dataclass
class PreparedSet:
    """One feature set (e.g. one layer) made ready for probing any label: the fit part of the
    training set in the basis of its own rows, the validation part in the same basis, and for the
    refit, the whole training set in its basis with the test set in the same."""
    fit: torch.Tensor  # (n_fit, r)
    val: torch.Tensor  # (n_val, r)
    train: torch.Tensor  # (n, r')
    test: torch.Tensor  # (m, r')
    fit_basis: Basis
    train_basis: Basis


@dataclass
class PreparedFeatures:
    """One or more feature sets (e.g. every layer of an encoder) prepared once for every label: the
    split of the training set into fit and validation parts (the same rows for every set) and a
    PreparedSet per feature set. For raw pixels the bases are the expensive part."""
    sets: list  # of PreparedSet
    fit_rows: torch.Tensor  # indices of the fit and validation parts in the training set
    val_rows: torch.Tensor


def validation_split(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple:
    """(validation rows, fit rows) of a training set of n: a seeded random `val_fraction` of it
    (at least one row) for choosing C and the layer, the rest for fitting."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    return order[:n_val], order[n_val:]


def prepare_features(train_sets: list, test_sets: list, val_fraction: float = 0.2, seed: int = 0) -> PreparedFeatures:
    """Lists of P arrays (n, d) and (m, d) with the same d -> PreparedFeatures. The validation part
    is a seeded random fifth of the training set (the same rows for every feature set and label)."""
    as64 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    train_sets, test_sets = [as64(a) for a in train_sets], [as64(a) for a in test_sets]
    n = len(train_sets[0])
    if any(len(a) != n for a in train_sets) or len({len(a) for a in test_sets}) != 1:
        raise ValueError("every feature set needs the same number of training and of test rows")
    val, fit = (torch.from_numpy(rows) for rows in validation_split(n, val_fraction, seed))
    sets = []
    for a, b in zip(train_sets, test_sets):
        (fit_basis, fit_x), (train_basis, train_x) = Basis.from_rows(a[fit]), Basis.from_rows(a)
        sets.append(PreparedSet(fit=fit_x, val=fit_basis.coordinates(a[val]), train=train_x,
                                test=train_basis.coordinates(b), fit_basis=fit_basis, train_basis=train_basis))
    return PreparedFeatures(sets=sets, fit_rows=fit, val_rows=val)


def probe_prepared(prepared: PreparedFeatures, train_y, test_y, Cs=(0.01, 0.1, 1.0, 10.0), max_iter: int = 1000) -> list:
    """Logistic regression on each prepared feature set: C chosen on the validation part, then refit
    on the whole training set at that C and scored once on the test set. A ProbeResult per set."""
    train_y, test_y = torch.as_tensor(np.asarray(train_y)).long(), torch.as_tensor(np.asarray(test_y)).long()
    if len(prepared.fit_rows) + len(prepared.val_rows) != len(train_y) or len(prepared.sets[0].test) != len(test_y):
        raise ValueError("features and labels differ in length")
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    y_fit, y_val = train_y[prepared.fit_rows], train_y[prepared.val_rows]
    results = []
    for s in prepared.sets:
        converged, fits, scores = True, [], []
        for C in Cs:  # in increasing order, each fit starts from the last one's optimum: fewer steps, the same optimum
            W, b, ok = fit_logistic(s.fit, y_fit, n_classes, C, max_iter, start=fits[-1] if fits else None)
            converged = converged and ok
            fits.append((W, b))
            scores.append(float(((s.val @ W + b).argmax(1) == y_val).double().mean()))
        best = int(np.argmax(scores))
        # the refit on the whole training set at the chosen C starts from that C's fit, carried over
        # to the whole set's standardisation and basis through the raw features
        start = s.train_basis.from_features(*s.fit_basis.to_features(*fits[best]))
        W, b, ok = fit_logistic(s.train, train_y, n_classes, Cs[best], max_iter, start=start)
        pred = (s.test @ W + b).argmax(1).numpy()
        results.append(ProbeResult(top1=float((pred == test_y.numpy()).mean()), C=Cs[best], val_top1=scores[best],
                                   macro_f1=float(f1_score(test_y.numpy(), pred, average="macro")), predictions=pred,
                                   converged=converged and ok))
    return results


def linear_probe(train_x, train_y, test_x, test_y, val_fraction: float = 0.2,
                 Cs=(0.01, 0.1, 1.0, 10.0), seed: int = 0, max_iter: int = 1000) -> ProbeResult:
    """Logistic regression on standardised features; C chosen on a held-out part of the training
    set, then refit on the whole training set and scored once on the test set."""
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("features and labels differ in length")
    return probe_prepared(prepare_features([train_x], [test_x], val_fraction, seed), train_y, test_y, Cs, max_iter)[0]
