"""How the representation grows with training: the project's probe of checkpoints along one run.

A long run of train.py that kept a copy of its checkpoint at several steps (`step-N.pt` files in
one folder, as checkpoints/reference/README.md's commands make them) is probed at each: the
teacher and the student, best layer chosen on validation, 4,000 training / 2,000 test scenes, for
`shape`, `count` and `distance`. The baselines are probed once, in the same way and on the same
splits: the same network at its initial weights (identical for every step: the run's seed rebuilds
it), raw pixels, and, with --ceiling-minutes, the supervised ceiling (the same encoder trained on
the labels for that long). Results accumulate in a JSON file, so checkpoints can be probed as the
run writes them; the figure is drawn from that file.

    python benchmarks/probe_vs_steps.py --run data/reference-run                       # probe what is new (2 processes), draw
    python benchmarks/probe_vs_steps.py --run data/reference-run --ceiling-minutes 2   # and the ceiling
    python benchmarks/probe_vs_steps.py --plot-only                                     # redraw from the JSON
"""

import argparse
import glob
import json
import multiprocessing
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import evaluate as E  # noqa: E402
import evaluation.stats as ST  # noqa: E402
import studies.supervised as SV  # noqa: E402
from benchmarks.learning import save_json  # noqa: E402

RESULTS = "benchmarks/results/probe_vs_steps.json"


def step_checkpoints(run: str) -> dict:
    """{step: path} of the `step-N.pt` copies in a run folder."""
    named = {p: re.fullmatch(r"step-(\d+)\.pt", os.path.basename(p)) for p in glob.glob(os.path.join(run, "step-*.pt"))}
    found = {int(match.group(1)): p for p, match in named.items() if match}
    if not found:
        raise SystemExit(f"error: no step-N.pt checkpoints in {run!r}: make them with the commands in "
                         "checkpoints/reference/README.md")
    return dict(sorted(found.items()))


def summarise(row: dict, names) -> dict:
    """probe_all's row for one label -> the numbers the figure and README need."""
    return {name: {"top1": row[name]["best_top1"], "stderr": row[name]["stderr"], "layer": row[name]["best_layer"],
                   "knn_top1": row[name]["knn_top1"]} for name in names}


def probe_task(task: tuple) -> tuple:
    """One unit of work, run in a worker process: ("step", N, path, ...) probes that checkpoint's
    teacher and student; ("baselines", None, path, ...) probes random init and raw pixels. Linear
    probe (best layer on validation) and k-NN; no concatenation probe."""
    kind, step, path, labels, n_train, n_test, cache_dir = task
    torch.set_num_threads(1)  # the fits are small: one core each, and as many workers as cores
    names = ("random_init", "pixels") if kind == "baselines" else ("teacher", "student")
    got = E.checkpoint_features(path, "scenes", n_train, n_test, cache_dir=cache_dir, pixels=kind == "baselines",
                                progress=False)
    features = {k: v for k, v in got["features"].items() if k in names}
    results = E.probe_all(features, got["train_labels"], got["test_labels"], labels, got["config"].seed,
                          progress=False, concat_last=0)
    rows = {label: summarise(results[label], names) for label in labels}
    if kind == "baselines":
        for label in labels:
            rows[label]["chance"] = results[label]["chance"]
    return kind, step, rows


def draw(results: dict, path: str) -> None:
    labels = list(results["baselines"])
    steps = sorted(int(s) for s in results["steps"])
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        for name, colour in (("teacher", "C0"), ("student", "C1")):
            acc = [results["steps"][str(s)][label][name]["top1"] for s in steps]
            err = [results["steps"][str(s)][label][name]["stderr"] for s in steps]
            ax.errorbar(steps, acc, yerr=err, marker="o", color=colour, label=name, capsize=3)
        base = results["baselines"][label]
        lines = [("random_init", "random init (same network)", "grey", ":"), ("pixels", "raw pixels", "black", "--")]
        if "ceiling" in base:
            lines.append(("ceiling", f"supervised, {results['ceiling_minutes']:g} min", "green", "-."))
        for key, text, colour, style in lines:
            ax.axhline(base[key]["top1"], color=colour, linestyle=style, label=text)
        ax.axhline(base["chance"], color="lightgrey", linewidth=1, label="chance")
        ax.set_xscale("log")
        ax.set_xticks(steps, [f"{s:,}" for s in steps], rotation=45)  # the probed steps, not log-axis minor labels
        ax.minorticks_off()
        ax.set_xlabel("pre-training steps (log scale)")
        ax.set_ylabel("probe top-1 on 2,000 test scenes")
        ax.set_title(f"{label}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Linear probe (best layer on validation) along one pre-training run; bars: +-1 standard error")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="folder of the run's step-N.pt checkpoints")
    ap.add_argument("--results", default=RESULTS, help="JSON file the numbers accumulate in")
    ap.add_argument("--figure", default="images/probe_vs_steps.png")
    ap.add_argument("--labels", nargs="+", default=list(data.LABELS), choices=data.LABELS)
    ap.add_argument("--probe-train", type=int, default=4000)
    ap.add_argument("--probe-test", type=int, default=2000)
    ap.add_argument("--ceiling-minutes", type=float, help="also train the supervised ceiling for this long per label")
    ap.add_argument("--cache", default="data/feature-cache", help="feature cache folder ('' for none)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes, one core each")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()

    results = {"steps": {}, "baselines": {}}
    if os.path.exists(args.results):
        with open(args.results) as f:
            results = json.load(f)
    if not args.plot_only:
        if not args.run:
            raise SystemExit("error: give --run FOLDER (or --plot-only to redraw from the JSON)")
        checkpoints = step_checkpoints(args.run)
        sizes = {"probe_train": args.probe_train, "probe_test": args.probe_test, "labels": args.labels}
        if any(results.get(k) != v for k, v in sizes.items()):
            results = {"steps": {}, "baselines": {}, **sizes}  # other sizes or labels: start again
        tasks = [("step", step, path) for step, path in checkpoints.items() if str(step) not in results["steps"]]
        if not results["baselines"]:  # random init and pixels: the same for every checkpoint of the run
            tasks.insert(0, ("baselines", None, next(iter(checkpoints.values()))))
        tasks = [(*t, args.labels, args.probe_train, args.probe_test, args.cache) for t in tasks]
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for kind, step, rows in pool.imap_unordered(probe_task, tasks):
                if kind == "baselines":
                    results["baselines"] = {label: {**rows[label], **results["baselines"].get(label, {})}
                                            for label in args.labels}
                else:
                    results["steps"][str(step)] = rows
                print(f"probed {kind}{'' if step is None else ' ' + str(step)}", flush=True)
                save_json(results, args.results)
        if args.ceiling_minutes and results.get("ceiling_minutes") != args.ceiling_minutes:
            cfg = E.checkpoint_encoders(next(iter(checkpoints.values())))[1]
            x_tr, ys_tr, x_te, ys_te, _ = E.probe_splits("scenes", cfg.resolution, args.probe_train, args.probe_test, cfg.seed)
            for label in args.labels:
                y_tr, y_te = ys_tr[label], ys_te[label]
                top1, steps = SV.train_supervised(x_tr, y_tr, x_te, y_te, data.num_classes(label),
                                                   args.ceiling_minutes, cfg.patch_size, seed=cfg.seed)
                results["baselines"][label]["ceiling"] = {"top1": top1, "stderr": ST.standard_error(top1, args.probe_test),
                                                          "steps": steps}
                print(f"supervised ceiling {label}: {top1:.3f} after {steps} steps", flush=True)
            results["ceiling_minutes"] = args.ceiling_minutes
            save_json(results, args.results)

    draw(results, args.figure)
    print(f"{'step':>6}  " + "  ".join(f"{label + ' t/s':>18}" for label in results["baselines"]))
    for step in sorted(int(s) for s in results["steps"]):
        row = results["steps"][str(step)]
        print(f"{step:>6}  " + "  ".join(f"{row[label]['teacher']['top1']:>8.3f} /{row[label]['student']['top1']:>7.3f}"
                                         for label in results["baselines"]))
    for key in ("random_init", "pixels", "ceiling"):
        if all(key in b for b in results["baselines"].values()):
            print(f"{key:>11}  " + "  ".join(f"{b[key]['top1']:>18.3f}" for b in results["baselines"].values()))
    print(f"figure: {args.figure}; numbers: {args.results}")


if __name__ == "__main__":
    main()
