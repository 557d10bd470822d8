"""The linear probe's solver: multinomial logistic regression with scikit-learn's objective and
stopping rule, fitted by preconditioned L-BFGS in torch, with its regularisation C chosen on a
validation part of the training set (`linear_probe`).

The protocol, scikit-learn's StandardScaler and LogisticRegression in a pipeline: C is chosen by the
accuracy on a seeded random fifth of the training set of a fit on the other four fifths (standardised
by their own mean and standard deviation); the fit at that C is repeated on the whole training set
(standardised by its own) and scored once on the test set. `prepare_features` does the
per-feature-set work once (the standardisation and a rotation into uncorrelated coordinates), so
that many labels can be probed on the same features. `benchmarks/probe_agreement.py` checks the
answers against scikit-learn; `benchmarks/probe_speed.py` times them."""

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
    converged: bool  # False when a fit stopped (max_iter, or no progress possible) before its stopping rule held


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float, max_iter: int = 1000, tol: float = 1e-4,
                 start=None, basis=None):
    """Multinomial logistic regression, full batch, by L-BFGS. The objective is scikit-learn's
    (C x the summed log-loss + half the squared norm of the weights, the bias unpenalised), divided
    by the number of samples, so the minimum is the same. The search stops by scikit-learn's rule:
    when the largest component of the gradient is below `tol`, in the coordinates scikit-learn
    fits in. Those are the standardised features; x may be their coordinates in a `basis` (then the
    gradient is turned back by the Basis before the rule looks at it). `start` (weights, bias)
    warm-starts the search; the problem is convex, so the optimum does not depend on it. Returns
    (weights, bias, converged) in x's dtype.

    The search runs in float32 first, where a step costs about half as much, and float64 finishes it
    when float32 could not: float32 resolves the objective to about 1e-7 of its size, which can be
    too coarse for the last line searches before the optimum. Both stages minimise the same
    objective and stop by the same rule."""
    d = x.shape[1]
    theta = torch.zeros(d + 1, n_classes, dtype=torch.float64)  # the weights (d rows), then the bias (one row)
    if start is not None:
        theta[:d], theta[d] = start[0], start[1]

    def turn(g):  # the weights' gradient (d, k) -> the same in the standardised features' coordinates
        return g if basis is None else basis.rotate(g)

    rows = d if basis is None else len(basis.mean)  # how many standardised features there are
    theta, steps, largest = _lbfgs(x.float(), y, n_classes, C, theta.float(), max_iter, tol, turn, rows)
    if largest > tol and steps < max_iter:
        theta, _, largest = _lbfgs(x.double(), y, n_classes, C, theta.double(), max_iter - steps, tol, turn, rows)
    theta = theta.to(x.dtype)
    return theta[:d].clone(), theta[d].clone(), largest <= tol


def _lbfgs(x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float, theta: torch.Tensor, max_iter: int,
           tol: float, turn, turned_rows: int, rescale_every: int = 30, history: int = 20) -> tuple:
    """fit_logistic's search in x's dtype from theta (d + 1, k): (theta, L-BFGS steps taken, the
    largest component of the gradient where it stopped, the weights' part turned by `turn` into
    the standardised features' coordinates, `turned_rows` of them).

    With P the softmax probabilities and Y the one-hot labels, the gradient is
    d/dW = x^T (P - Y) / n + W / (C n) and d/db = sum over samples of (P - Y) / n. Every evaluation
    reads x twice (once for the logits, once for the gradient) and little else, so the search costs
    what reading x costs, times the evaluations. x is kept once, transposed to (d, n), and both
    products read it in that layout, (k, d) @ (d, n) and (d, n) @ (n, k): one copy of 3,200 x 2,048
    float32 features (26 MB) stays in a 32 MB cache where two did not (a gradient took 15 ms against
    20 ms with x kept both ways).

    The search is L-BFGS written out (the two-loop recursion over the last `history` steps) with a
    backtracking line search that tries the full step first. The objective is strictly convex, so
    every step's curvature pair is usable and no stronger line search is needed; most steps take
    one evaluation (the reference teacher's five layers and concat-4 over 4 x 4 cells: 1,022 passes
    over the features for 911 steps, the starts and Hessian diagonals included). Written out, the stopping rule is checked at every step on the gradient the
    step has already computed (torch.optim.LBFGS spends an evaluation on each call and would be
    checked only between calls).

    Preconditioning: the search walks in rescaled parameters u = theta sqrt(h), with h the diagonal
    of the objective's Hessian at the current point, one value per feature and class: mean over
    samples of x^2 P (1 - P), plus 1 / (C n) for the weights. prepare_features rotates the features
    into the eigenvectors of their covariance, so at the start (every class at probability 1/k)
    that diagonal is nearly the whole Hessian and every direction looks alike. The Hessian changes
    as the fit proceeds: with weak regularisation (C = 1 or 10) on many features, the classes
    separate, P (1 - P) falls towards 0 for most samples, and a scale fixed at the start leaves the
    problem badly conditioned near the optimum (2,048 pooled digit features, C = 10: the fit
    stopped at twice the optimum's objective). So every `rescale_every` steps h is computed again
    where the search stands, and the memory of earlier steps, which was in the old scale, is
    dropped."""
    n, d = x.shape
    xt = x.T.contiguous()  # (d, n), the only copy of the features the search reads
    onehot = F.one_hot(y, n_classes).to(x.dtype).T.contiguous()  # (k, n)
    penalty = 1.0 / (C * n)

    def logits(theta):  # (k, n)
        return torch.addmm(theta[d][:, None], theta[:d].T, xt)

    def gradient(theta):  # (objective, its gradient (d + 1, k))
        log_p = logits(theta).log_softmax(0)
        W = theta[:d]
        loss = -(log_p * onehot).sum() / n + 0.5 * penalty * (W * W).sum()
        residual = (log_p.exp() - onehot) / n  # (k, n): d loss / d logits
        grad = torch.empty_like(theta)
        grad[:d] = xt @ residual.T + penalty * W  # x^T residual + penalty * W, as (d, n) @ (n, k)
        grad[d] = residual.sum(1)
        return float(loss), grad

    def hessian_diagonal(theta):  # (d + 1, k)
        p = logits(theta).softmax(0)
        q = p * (1 - p) / n  # (k, n)
        # the bias gets one scale for every class: a constant added to every class's bias changes
        # no probability, so the bias is defined only up to it; with a common scale the steps keep
        # the classes' sum of biases where it started, as plain gradient steps would
        return torch.cat([xt.pow(2) @ q.T + penalty, q.sum(1).mean().expand(1, n_classes)])

    def largest_component(grad):  # the stopping rule's number, in scikit-learn's coordinates
        bias = float(grad[d].abs().max())
        # the turn keeps lengths (orthonormal columns), so the largest component of a turned column
        # is at least its length / sqrt(turned_rows): far from the rule, that bound answers alone
        lower = float(grad[:d].norm(dim=0).max()) / turned_rows ** 0.5
        return max(lower if lower > tol else float(turn(grad[:d]).abs().max()), bias)

    loss, grad = gradient(theta)
    largest = largest_component(grad)
    steps = 0
    while largest > tol and steps < max_iter:
        scale = hessian_diagonal(theta).clamp_min(torch.finfo(x.dtype).tiny).rsqrt()  # theta = u * scale
        g = grad * scale  # the gradient in u (chain rule)
        pairs = []  # (s, y, 1 / y.s): the last steps in u and the change of the gradient along them
        for _ in range(min(rescale_every, max_iter - steps)):
            # two-loop recursion: direction = -(the inverse Hessian that the pairs imply) @ g
            q, alphas = g.clone(), []
            for s, yv, rho in reversed(pairs):
                alphas.append(rho * (s * q).sum())
                q -= alphas[-1] * yv
            if pairs:
                s, yv, rho = pairs[-1]
                q *= 1.0 / (rho * (yv * yv).sum())  # the initial inverse Hessian: s.y / y.y
            for (s, yv, rho), alpha in zip(pairs, reversed(alphas)):
                q += (alpha - rho * (yv * q).sum()) * s
            direction = -q
            slope = float((g * direction).sum())
            if not slope < 0:  # rounding can spoil the pairs near the optimum: start again from the gradient
                pairs, direction, slope = [], -g, -float((g * g).sum())
            if -slope <= 10 * torch.finfo(x.dtype).eps * abs(loss):
                # the step would lower the objective by less than this precision resolves of it: what
                # the line search sees is rounding, and float64 (fit_logistic) takes over
                return theta, steps, largest
            # backtracking from the full step until the objective falls enough (Armijo's rule)
            for halvings in range(20):
                t = 0.5 ** halvings
                new_theta = theta + (t * direction) * scale
                new_loss, new_grad = gradient(new_theta)
                if new_loss <= loss + 1e-4 * t * slope:
                    break
            else:  # no step lowers the objective that this precision can see: the search ends here
                return theta, steps, largest
            new_g = new_grad * scale
            s, yv = t * direction, new_g - g
            ys = float((s * yv).sum())
            if ys > 0:  # strict convexity makes it positive, up to rounding
                pairs = (pairs + [(s, yv, 1.0 / ys)])[-history:]
            theta, loss, grad, g = new_theta, new_loss, new_grad, new_g
            steps += 1
            largest = largest_component(grad)
            if largest <= tol:
                break
    return theta, steps, largest


@dataclass
class Basis:
    """How a feature set is shown to the logistic regression: standardised by the mean and standard
    deviation of the rows it is fitted on, then rotated into the eigenvectors of their covariance, so
    that the coordinates are uncorrelated (which makes fit_logistic's preconditioning exact at the
    start). The rotation is orthonormal, so the squared norm of the weights, and with it the
    objective and its optimum, are unchanged. With more features than rows (raw pixels, pooled
    grids, concat-4) it keeps only the rows' span, where the L2-penalised optimum lies: each step
    then costs n x n, not n x d.

    The rotation is kept as diagonal blocks: one for a feature set, one per set for sets side by
    side (concat-4, `side_by_side`), whose block-diagonal rotation is orthonormal because each block
    is. It is applied block by block: the stopping rule turns the gradient back at every check, and
    a dense 8,192 x 8,192 block-diagonal rotation, read whole, took 109 ms each time."""
    mean: torch.Tensor  # (d,)
    std: torch.Tensor  # (d,)
    blocks: list  # of (d_i, r_i) orthonormal columns; one block of r = min(d, n) columns for one feature set

    @property
    def rotation(self) -> torch.Tensor:
        """The whole rotation (d, r)."""
        return self.blocks[0] if len(self.blocks) == 1 else torch.block_diag(*self.blocks)

    @classmethod
    def from_rows(cls, x: torch.Tensor, rotation=None) -> tuple:
        """Rows (n, d) -> (their Basis, their coordinates (n, r)). `rotation`: keep this one (d, d)
        instead of finding the rows' own (the whole training set's, for its fit part).

        Float32 is enough here: the features come out of float32 networks, and Householder QR and
        eigh return factors that are orthonormal to float32's precision (about 1e-6) however the
        features are conditioned. Orthonormality is all the objective needs to be unchanged; the
        eigenvectors need only be near the true ones for the preconditioning."""
        mean, std = x.mean(0), x.std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))  # constant features stay zero, as in scikit-learn
        s = (x - mean) / std  # (n, d)
        if rotation is not None:
            return cls(mean, std, [rotation]), s @ rotation
        if s.shape[1] <= s.shape[0]:
            _, eigenvectors = torch.linalg.eigh(s.T @ s)  # of the covariance (times n)
            return cls(mean, std, [eigenvectors]), s @ eigenvectors
        # more features than rows: the rows' span, s^T = span @ r with span (d, n) orthonormal; the
        # rows are r^T there, and are turned into the eigenvectors of their covariance inside it
        span, r = torch.linalg.qr(s.T)
        _, eigenvectors = torch.linalg.eigh(r @ r.T)
        return cls(mean, std, [span @ eigenvectors]), r.T @ eigenvectors

    @classmethod
    def side_by_side(cls, bases: list) -> "Basis":
        """The bases of feature sets whose features are concatenated, as one Basis."""
        return cls(torch.cat([b.mean for b in bases]), torch.cat([b.std for b in bases]),
                   [block for b in bases for block in b.blocks])

    def coordinates(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features (m, d) -> their coordinates (m, r)."""
        parts = ((x - self.mean) / self.std).split([len(block) for block in self.blocks], 1)
        return torch.cat([part @ block for part, block in zip(parts, self.blocks)], 1)

    def rotate(self, v: torch.Tensor) -> torch.Tensor:
        """Weights on the coordinates (r, k) -> the same weights on the standardised features (d, k)."""
        parts = v.split([block.shape[1] for block in self.blocks])
        # block @ part, computed as (part^T @ block^T)^T: with only k columns on its right, the
        # product block @ part ran 4 times slower (2,048 x 2,048 rotation: 19.6 ms against 4.7)
        return torch.cat([(part.T @ block.to(v.dtype).T).T for part, block in zip(parts, self.blocks)])

    def unrotate(self, v: torch.Tensor) -> torch.Tensor:
        """Weights on the standardised features (d, k) -> on the coordinates (r, k)."""
        parts = v.split([len(block) for block in self.blocks])
        return torch.cat([(part.T @ block.to(v.dtype)).T for part, block in zip(parts, self.blocks)])

    def to_features(self, W: torch.Tensor, b: torch.Tensor) -> tuple:
        """A linear map (W, b) on the coordinates -> the same map on the raw features."""
        W_raw = self.rotate(W) / self.std[:, None]  # (d, k)
        return W_raw, b - self.mean @ W_raw

    def from_features(self, W_raw: torch.Tensor, b_raw: torch.Tensor) -> tuple:
        """A linear map on the raw features -> the map on the coordinates that agrees with it on the
        rows' span (everywhere, when d <= n)."""
        return self.unrotate(W_raw * self.std[:, None]), b_raw + self.mean @ W_raw


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
    # float32, the features' own precision (Basis.from_rows says why no more is needed)
    train_sets = [torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in train_sets]
    test_sets = [torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in test_sets]
    n = len(train_sets[0])
    if any(len(a) != n for a in train_sets) or len({len(a) for a in test_sets}) != 1:
        raise ValueError("every feature set needs the same number of training and of test rows")
    val, fit = (torch.from_numpy(rows) for rows in validation_split(n, val_fraction, seed))
    sets = []
    for a, b in zip(train_sets, test_sets):
        train_basis, train_x = Basis.from_rows(a)
        # the fit part is standardised by its own rows, as scikit-learn's scaler would be (validation
        # rows standardised by statistics they took part in would look easier than test rows); with
        # d <= n it may keep the whole set's rotation, which is orthonormal and nearly decorrelates it
        fit_basis, fit_x = Basis.from_rows(a[fit], train_basis.rotation if len(train_basis.rotation) <= len(fit) else None)
        sets.append(PreparedSet(fit=fit_x, val=fit_basis.coordinates(a[val]), train=train_x,
                                test=train_basis.coordinates(b), fit_basis=fit_basis, train_basis=train_basis))
    return PreparedFeatures(sets=sets, fit_rows=fit, val_rows=val)


def side_by_side(prepared: PreparedFeatures, which: list):
    """The feature sets `which` of `prepared` side by side (concat-4), as one PreparedFeatures, without
    a basis of their own: each set keeps its rotation, and rotations side by side (block-diagonal)
    are again orthonormal, so the objective is the one on the concatenated standardised features.
    Each set's coordinates are uncorrelated within it but not across sets, so the search takes more
    steps than in a basis of the concatenation's own. That pays only where the concatenation has
    more features than the fit part has rows, and its own basis would be a QR and an n x n
    eigendecomposition: on 4 x 2,048 pooled features and 4,000 rows, 30 s of basis per encoder
    against about 8 s more search; on the scenes' 4 x 128 features its own basis takes well under a
    second, and the search side by side took 19 s where it takes 1. None where it does not pay, or
    where a set's basis keeps only its rows' span: then prepare_features on the concatenation."""
    sets = [prepared.sets[i] for i in which]
    if sum(s.fit.shape[1] for s in sets) <= len(prepared.fit_rows) or \
            any(b.rotation.shape[0] != b.rotation.shape[1] for s in sets for b in (s.fit_basis, s.train_basis)):
        return None

    joined_set = PreparedSet(**{part: torch.cat([getattr(s, part) for s in sets], 1) for part in ("fit", "val", "train", "test")},
                             fit_basis=Basis.side_by_side([s.fit_basis for s in sets]),
                             train_basis=Basis.side_by_side([s.train_basis for s in sets]))
    return PreparedFeatures(sets=[joined_set], fit_rows=prepared.fit_rows, val_rows=prepared.val_rows)


def probe_prepared(prepared: PreparedFeatures, train_y, test_y, Cs=(0.01, 0.1, 1.0, 10.0), max_iter: int = 1000,
                   tol: float = 1e-4) -> list:
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
            W, b, ok = fit_logistic(s.fit, y_fit, n_classes, C, max_iter, tol, start=fits[-1] if fits else None,
                                    basis=s.fit_basis)
            converged = converged and ok
            fits.append((W, b))
            scores.append(float(((s.val @ W + b).argmax(1) == y_val).double().mean()))
        best = int(np.argmax(scores))
        # the refit on the whole training set at the chosen C starts from that C's fit, carried over
        # to the whole set's standardisation and basis through the raw features
        start = s.train_basis.from_features(*s.fit_basis.to_features(*fits[best]))
        W, b, ok = fit_logistic(s.train, train_y, n_classes, Cs[best], max_iter, tol, start=start,
                                basis=s.train_basis)
        pred = (s.test @ W + b).argmax(1).numpy()
        results.append(ProbeResult(top1=float((pred == test_y.numpy()).mean()), C=Cs[best], val_top1=scores[best],
                                   macro_f1=float(f1_score(test_y.numpy(), pred, average="macro")), predictions=pred,
                                   converged=converged and ok))
    return results


def linear_probe(train_x, train_y, test_x, test_y, val_fraction: float = 0.2,
                 Cs=(0.01, 0.1, 1.0, 10.0), seed: int = 0, max_iter: int = 1000, tol: float = 1e-4) -> ProbeResult:
    """Logistic regression on standardised features (the module's protocol): C chosen on a
    held-out part of the training set, then refit on the whole training set and scored once on the
    test set."""
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("features and labels differ in length")
    return probe_prepared(prepare_features([train_x], [test_x], val_fraction, seed), train_y, test_y, Cs, max_iter,
                          tol)[0]
