"""Does the fast torch probe measure what the scikit-learn probe measured?

The probe (`evaluation/logistic.py`) fits its logistic regressions with full-batch L-BFGS in
torch, on scikit-learn's objective, in a rotated basis of the features (the eigenvectors of their
covariance, with a preconditioner), and stops by scikit-learn's rule (the largest component of the
gradient below `tol`, 1e-4 unless --tol says otherwise, for both). This script runs both on the
same features of a checkpoint (teacher, student, random init, raw pixels; the same validation
split, the same C grid, the same layer choice on validation) and prints their test accuracies side
by side, the difference in standard errors, and the time each took.

    python benchmarks/probe_agreement.py --checkpoint checkpoints/demo/checkpoint.pt
    python benchmarks/probe_agreement.py --checkpoint CKPT --labels shape --no-pixels
    python benchmarks/probe_agreement.py --checkpoint CKPT --labels count --encoders student --per-C
    python benchmarks/probe_agreement.py --checkpoint CKPT --dataset data/digits --pool-grid 4   # pooled, wide
    python benchmarks/probe_agreement.py --checkpoint CKPT --dataset data/digits --pool-grid 4 --tol 1e-6 --max-iter 20000

--per-C explains a disagreement: for every layer and every C of the grid it prints each
implementation's validation accuracy, the objective it reached (the same formula for both: mean
log-loss + |W|^2 / (2 C n)) and whether it converged within max_iter. Two fits that converged reach
the same optimum (the problem is strictly convex), so a gap in accuracy can only come from a fit
that stopped early or from a different C or layer chosen on close validation scores. With weak
regularisation on many features the objective is so flat near its optimum that a gradient below
1e-4 can lie far from it; --tol 1e-6 runs both nearer the optimum (scikit-learn then takes much
longer).
"""

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import evaluate as E  # noqa: E402
import evaluation.logistic as LR  # noqa: E402
import evaluation.probes as PR  # noqa: E402
import evaluation.stats as ST  # noqa: E402
import train as T  # noqa: E402


def sklearn_probe(train_x, train_y, test_x, test_y, val_fraction=0.2, Cs=(0.01, 0.1, 1.0, 10.0), seed=0, max_iter=1000,
                  tol=1e-4):
    """The reference: the same protocol as `evaluate.linear_probe`, fitted by scikit-learn.
    Returns (test top-1, validation top-1 at the chosen C)."""
    val, fit = LR.validation_split(len(train_x), val_fraction, seed)

    def fitted(x, y, C):
        scaler = StandardScaler().fit(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return scaler, LogisticRegression(C=C, max_iter=max_iter, tol=tol).fit(scaler.transform(x), y)

    scores = []
    for C in Cs:
        scaler, clf = fitted(train_x[fit], train_y[fit], C)
        scores.append(float((clf.predict(scaler.transform(train_x[val])) == train_y[val]).mean()))
    best = int(np.argmax(scores))
    scaler, clf = fitted(train_x, train_y, Cs[best])
    return float((clf.predict(scaler.transform(test_x)) == test_y).mean()), scores[best]


def objective(x, y, W, b, C):
    """The objective both implementations minimise, per sample: mean log-loss + |W|^2 / (2 C n)."""
    x, y, W, b = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (x, y, W, b))
    return float(F.cross_entropy(x @ W + b, y.long()) + (W * W).sum() / (2 * C * len(x)))


def per_C(train_x, train_y, Cs=(0.01, 0.1, 1.0, 10.0), val_fraction=0.2, seed=0, max_iter=1000, tol=1e-4):
    """Each C of the grid, fitted on the fit part and scored on the validation part by both
    implementations, from the same standardised features: a list of dicts."""
    val, fit = LR.validation_split(len(train_x), val_fraction, seed)
    scaler = StandardScaler().fit(train_x[fit])
    x_fit, x_val = scaler.transform(train_x[fit]), scaler.transform(train_x[val])
    y_fit, y_val = train_y[fit], train_y[val]
    n_classes = int(train_y.max()) + 1
    rows, start = [], None
    for C in Cs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(C=C, max_iter=max_iter, tol=tol).fit(x_fit, y_fit)
        W, b, ok = LR.fit_logistic(torch.as_tensor(x_fit), torch.as_tensor(y_fit).long(), n_classes, C, max_iter, tol,
                                   start=start)
        start = (W, b)  # as the probe does: each C warm-started from the last
        rows.append(dict(C=C, sklearn_val=float((clf.predict(x_val) == y_val).mean()),
                         sklearn_objective=objective(x_fit, y_fit, clf.coef_.T, clf.intercept_, C),
                         sklearn_converged=bool(clf.n_iter_[0] < max_iter),
                         torch_val=float(((torch.as_tensor(x_val) @ W + b).argmax(1).numpy() == y_val).mean()),
                         torch_objective=objective(x_fit, y_fit, W, b, C), torch_converged=bool(ok)))
    return rows


def best_of(results):
    """(test top-1 of the layer best on validation, that layer) from [(test top-1, validation top-1)]."""
    k = int(np.argmax([val for _, val in results]))
    return results[k][0], k + 1


def both_probes(a, b, y_tr, y_te, seed, **fitting):
    """{probe: {implementation: (test top-1, layer, seconds)}} for the best layer and, where the encoder
    has four blocks, concat-4. Torch's side is the probe's own path (`probes.prepare_encoder`: the
    layers' bases, and concat-4 from them side by side where it is wider than the fit rows);
    scikit-learn's fits the raw features."""
    out = {"best layer": {}, "concat-4": {}}
    t0 = time.perf_counter()
    prepared = PR.prepare_encoder(a, b, seed)
    layers = LR.probe_prepared(prepared["layers"], y_tr, y_te, **fitting)
    out["best layer"]["torch"] = (*best_of([(r.top1, r.val_top1) for r in layers]), time.perf_counter() - t0)
    if "concat" in prepared:
        t0 = time.perf_counter()
        out["concat-4"]["torch"] = (LR.probe_prepared(prepared["concat"], y_tr, y_te, **fitting)[0].top1, None,
                                    time.perf_counter() - t0)
    t0 = time.perf_counter()
    fits = [sklearn_probe(x, y_tr, x_te, y_te, seed=seed, **fitting) for x, x_te in zip(a, b)]
    out["best layer"]["sklearn"] = (*best_of(fits), time.perf_counter() - t0)
    if "concat" in prepared:
        t0 = time.perf_counter()
        out["concat-4"]["sklearn"] = (sklearn_probe(PR.concat_blocks(a), y_tr, PR.concat_blocks(b), y_te, seed=seed,
                                                    **fitting)[0], None, time.perf_counter() - t0)
    return {probe: row for probe, row in out.items() if row}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=T.REFERENCE_CHECKPOINT)
    ap.add_argument("--dataset", default="scenes", help="scenes, or a folder of class sub-folders (label: class)")
    ap.add_argument("--labels", nargs="+", help="labels to probe (default: every label of the dataset)")
    ap.add_argument("--pool-grid", type=int, default=1, help="features pooled over K x K cells (K * K times wider)")
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--no-pixels", action="store_true", help="skip raw pixels (scikit-learn takes minutes per label there)")
    ap.add_argument("--encoders", nargs="+", default=None, help="only these (teacher student random_init pixels)")
    ap.add_argument("--per-C", action="store_true", help="validation accuracy, objective and convergence per layer and C")
    ap.add_argument("--Cs", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0],
                    help="the grid of inverse regularisation strengths, for both implementations (default: the probe's)")
    ap.add_argument("--tol", type=float, default=1e-4,
                    help="both stop when the gradient's largest component is below this (default: scikit-learn's 1e-4)")
    ap.add_argument("--max-iter", type=int, default=1000, help="at most this many iterations per fit, for both")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    wanted = args.encoders or [*E.ENCODERS, "pixels"]
    got = E.checkpoint_features(args.checkpoint, args.dataset, args.train, args.test, cache_dir=None,
                                pixels=not args.no_pixels and "pixels" in wanted, progress=False, labels=args.labels,
                                encoders=[name for name in E.ENCODERS if name in wanted], pool_grid=args.pool_grid)
    args.labels = args.labels or got["labels"]
    seed = got["config"].seed
    if args.per_C:
        for label in args.labels:
            y_tr = got["train_labels"][label].numpy()
            for name, (a, _) in got["features"].items():
                for layer, x in enumerate(a, start=1):
                    for r in per_C(x, y_tr, Cs=tuple(args.Cs), seed=seed, max_iter=args.max_iter, tol=args.tol):
                        print(f"{label:<9}{name:<12}layer {layer}  C {r['C']:<5g} validation: scikit-learn "
                              f"{r['sklearn_val']:.4f} torch {r['torch_val']:.4f}   objective: scikit-learn "
                              f"{r['sklearn_objective']:.6f} torch {r['torch_objective']:.6f}   converged: "
                              f"{r['sklearn_converged']}/{r['torch_converged']}", flush=True)
        return
    fitting = {"Cs": tuple(args.Cs), "max_iter": args.max_iter, "tol": args.tol}
    rows = []
    for label in args.labels:
        y_tr, y_te = got["train_labels"][label].numpy(), got["test_labels"][label].numpy()
        for name, (a, b) in got["features"].items():
            for probe, row in both_probes(a, b, y_tr, y_te, seed, **fitting).items():
                (s_acc, s_layer, s_time), (t_acc, t_layer, t_time) = row["sklearn"], row["torch"]
                se = np.hypot(ST.standard_error(s_acc, len(y_te)), ST.standard_error(t_acc, len(y_te)))
                rows.append(dict(label=label, encoder=name, probe=probe, sklearn=s_acc, sklearn_layer=s_layer,
                                 sklearn_s=round(s_time, 2), torch=t_acc, torch_layer=t_layer, torch_s=round(t_time, 2),
                                 diff_in_se=round((t_acc - s_acc) / max(se, 1e-12), 2)))
                r = rows[-1]
                where = lambda layer: f" [layer {layer}]" if layer else ""  # noqa: E731
                print(f"{label:<9}{name:<12}{probe:<11} scikit-learn {s_acc:.4f}{where(s_layer)} {s_time:7.1f} s   "
                      f"torch {t_acc:.4f}{where(t_layer)} {t_time:6.1f} s   difference {r['diff_in_se']:+.2f} s.e.", flush=True)
    worst = max(abs(r["diff_in_se"]) for r in rows)
    s_total, t_total = sum(r["sklearn_s"] for r in rows), sum(r["torch_s"] for r in rows)
    print(f"\nlargest difference {worst:.2f} standard errors; scikit-learn {s_total:.0f} s, torch {t_total:.0f} s "
          f"({s_total / max(t_total, 1e-9):.1f}x)")
    if args.json:
        print(json.dumps({"command": " ".join(sys.argv), "rows": rows, "max_abs_diff_in_se": worst, "sklearn_s": s_total,
                          "torch_s": t_total}))


if __name__ == "__main__":
    main()
