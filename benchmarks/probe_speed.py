"""How long does the probe of a checkpoint take, and how long did it take before a change to the solver?

Times `evaluate.py probe`'s work on one set of features: extracting them (teacher, student, random
init, raw pixels), then the linear probes (every layer, concat-4) and k-NN of each encoder, with the
solver in `evaluation/logistic.py` now and, with --before REV, with that file as it was at git
revision REV, on the same features in the same run. It prints each encoder's time under each and
whether both chose the same layer and scored the same.

    python benchmarks/probe_speed.py --checkpoint CKPT --dataset data/digits --pool-grid 4 --before 5608757
    python benchmarks/probe_speed.py --checkpoint CKPT --dataset data/digits --pool-grid 4 --encoders student
    python benchmarks/probe_speed.py --checkpoint checkpoints/reference/checkpoint.pt   # the scenes, plain mean
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import evaluate as E  # noqa: E402
import evaluation.probes as PR  # noqa: E402


def solver_at(rev: str):
    """evaluation/logistic.py as it was at git revision `rev`, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:evaluation/logistic.py"], cwd=ROOT, capture_output=True, text=True, check=False)
    if source.returncode:
        raise SystemExit(f"probe_speed.py: cannot read evaluation/logistic.py at {rev!r}: {source.stderr.strip()}")
    path = os.path.join(tempfile.mkdtemp(), "logistic_before.py")
    with open(path, "w") as f:
        f.write(source.stdout)
    spec = importlib.util.spec_from_file_location("logistic_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed_probe(got: dict, solver=None) -> dict:
    """{encoder: (seconds, {label: (best layer, linear top-1, concat-4 top-1)})}, every encoder probed
    as probe_all does, with `solver` (a module with prepare_features, probe_prepared and perhaps
    side_by_side) in place of the current one when given."""
    saved = PR.prepare_features, PR.probe_prepared, PR.side_by_side
    if solver is not None:  # a solver without side_by_side makes concat-4 a basis of its own, as it did
        PR.prepare_features, PR.probe_prepared = solver.prepare_features, solver.probe_prepared
        PR.side_by_side = getattr(solver, "side_by_side", lambda prepared, which: None)
    try:
        out = {}
        for name, (a, b) in got["features"].items():
            t0 = time.perf_counter()
            results = E.probe_all({name: (a, b)}, got["train_labels"], got["test_labels"], got["labels"],
                                  got["config"].seed, progress=False)
            out[name] = (time.perf_counter() - t0, {label: (row[name]["best_layer"], row[name]["best_top1"],
                                                            row[name].get("concat_top1"))
                                                    for label, row in results.items()})
        return out
    finally:
        PR.prepare_features, PR.probe_prepared, PR.side_by_side = saved


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dataset", default="scenes")
    ap.add_argument("--pool-grid", type=int, default=1)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--encoders", nargs="+", default=[*E.ENCODERS, "pixels"],
                    help="what to probe, of teacher student random_init pixels (default: all, as evaluate.py probe)")
    ap.add_argument("--before", help="a git revision: also time evaluation/logistic.py as it was there")
    ap.add_argument("--json", help="write the timings here")
    args = ap.parse_args()

    t0 = time.perf_counter()
    got = E.checkpoint_features(args.checkpoint, args.dataset, args.train, args.test, cache_dir=None, progress=False,
                                pool_grid=args.pool_grid, pixels="pixels" in args.encoders,
                                encoders=[name for name in E.ENCODERS if name in args.encoders])
    extract = time.perf_counter() - t0
    widths = {name: [a.shape[1] for a in layers] for name, (layers, _) in got["features"].items()}
    print(f"features: {extract:.1f} s ({len(got['train_images'])} train / {len(got['test_images'])} test images; "
          f"widths {widths})", flush=True)
    runs = {"now": timed_probe(got)}
    if args.before:
        runs["before"] = timed_probe(got, solver_at(args.before))
    report = {"command": " ".join(sys.argv), "extract_s": extract, "widths": widths, "encoders": {}}
    for name in got["features"]:
        row = {run: {"seconds": round(timed[name][0], 1), "results": timed[name][1]} for run, timed in runs.items()}
        report["encoders"][name] = row
        line = "   ".join(f"{run} {r['seconds']:6.1f} s" for run, r in row.items())
        same = "" if len(row) == 1 else f"   same results: {row['now']['results'] == row['before']['results']}"
        print(f"{name:<12} {line}{same}   {row['now']['results']}", flush=True)
    for run, timed in runs.items():
        total = extract + sum(seconds for seconds, _ in timed.values())
        report[f"total_{run}_s"] = round(total, 1)
        print(f"total with the features, {run}: {total:.0f} s ({total / 60:.1f} min)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=lambda v: float(v) if isinstance(v, np.floating) else str(v))


if __name__ == "__main__":
    main()
