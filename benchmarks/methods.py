"""Why predict features? I-JEPA against MAE and a SIGReg JEPA, from the runs that learning.py recorded.

Every run is made by `benchmarks/learning.py --record FILE --name NAME` (pre-training, then the
project's probe of teacher, student and random init on `shape`, `count` and `distance`), so the
file holds each run's numbers and the command that made it. This script reads the file and
applies the study's rules, stated before the numbers:

  1. A sweep per method, on seed 0: each setting of the method's own knob (MAE: --mask-ratio and
     the decoder's depth; SIGReg: its weight) is a run named "<method>-sweep-<anything>". The
     setting kept is the one with the best validation accuracy of its encoder (the probe's best
     layer, on the validation fifth of the probe's training scenes), averaged over the labels:
     never the test accuracy.
  2. The seeds: the kept setting, and I-JEPA, run over seeds 0 and 1 ("<method>-seed<k>",
     "ijepa-seed<k>"; the kept sweep run is the method's seed 0 unless a "<method>-seed0" exists). Each method's encoder (I-JEPA's teacher, the encoder the paper probes; the
     others have one encoder) is compared with I-JEPA's on each label by `evaluation.stats.compare`
     (beyond 2 standard errors of the difference).
  3. A verdict per label counts only when both seeds agree: "better" or "worse" on both; anything
     else is "no difference the seeds agree on".

    python benchmarks/methods.py benchmarks/results/methods.json        # the sweeps, the seeds, the verdicts
    python benchmarks/methods.py benchmarks/results/methods.json --json  # the same as JSON
    python benchmarks/methods.py benchmarks/results/methods.json --measure  # first measure every kept checkpoint in full

The runs it reads, in order (R = benchmarks/results/methods.json; M = the I-JEPA baseline's training
time in minutes, its log's last "seconds" / 60, so that every method gets the same wall-clock budget
on the same machine; MAE's encoder sees a quarter of the tokens, so it takes more steps in M):

    # I-JEPA: the demo-recipe models of the normalisation study (Loss_Maps.ipynb trains them)
    python benchmarks/learning.py --checkpoint checkpoints/norm-study/layernorm-seed0/checkpoint.pt --no-pixels --record R --name ijepa-seed0
    python benchmarks/learning.py --checkpoint checkpoints/norm-study/layernorm-seed1/checkpoint.pt --no-pixels --record R --name ijepa-seed1
    # the sweeps, seed 0: MAE's mask ratio and decoder depth, SIGReg's weight
    python benchmarks/learning.py --minutes M --set method=mae loss=mse mask_ratio=0.6 --no-pixels --record R --name mae-sweep-r0.6
    python benchmarks/learning.py --minutes M --set method=mae loss=mse mask_ratio=0.75 --no-pixels --record R --name mae-sweep-r0.75
    python benchmarks/learning.py --minutes M --set method=mae loss=mse mask_ratio=0.75 predictor_depth=1 --no-pixels --record R --name mae-sweep-r0.75-d1
    python benchmarks/learning.py --minutes M --set method=sigreg sigreg_weight=0.02 --no-pixels --record R --name sigreg-sweep-w0.02
    python benchmarks/learning.py --minutes M --set method=sigreg sigreg_weight=0.05 --no-pixels --record R --name sigreg-sweep-w0.05
    python benchmarks/learning.py --minutes M --set method=sigreg sigreg_weight=0.1 --no-pixels --record R --name sigreg-sweep-w0.1
    # seed 1 with each method's kept setting (its kept sweep run is its seed 0)
    python benchmarks/learning.py --minutes M --seed 1 --set method=mae loss=mse KEPT --no-pixels --record R --name mae-seed1
    python benchmarks/learning.py --minutes M --seed 1 --set method=sigreg KEPT --no-pixels --record R --name sigreg-seed1
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import evaluation.stats as ST  # noqa: E402
import studies.features_vs_pixels as FV  # noqa: E402
from benchmarks import learning  # noqa: E402

LABELS = ("shape", "count", "distance")
BASELINE = "ijepa"
# The encoder each run is judged by: I-JEPA's teacher, the encoder the paper probes. MAE and SIGReg
# have one encoder; their teacher slot holds a copy of it.
ENCODER = "teacher"


def labels_of(run: dict) -> list:
    return [label for label in LABELS if label in run]


def mean_validation(run: dict) -> float:
    """The sweep's criterion: the encoder's validation accuracy (best layer), averaged over the labels."""
    labels = labels_of(run)
    return sum(run[label][f"{ENCODER}_val"] for label in labels) / len(labels)


def sweeps(runs: dict) -> dict:
    """{method: {"runs": {name: mean validation}, "kept": name}} over the runs named <method>-sweep-*."""
    out = {}
    for name, run in runs.items():
        method, _, rest = name.partition("-sweep-")
        if rest:
            out.setdefault(method, {"runs": {}})["runs"][name] = mean_validation(run)
    for sweep in out.values():
        sweep["kept"] = max(sweep["runs"], key=sweep["runs"].get)
    return out


def seeds_of(runs: dict, method: str) -> dict:
    """{seed: run} of the runs named <method>-seed<k>."""
    prefix = f"{method}-seed"
    return {int(name[len(prefix):]): run for name, run in runs.items()
            if name.startswith(prefix) and name[len(prefix):].isdigit()}


def accuracy_se(run: dict, label: str) -> tuple:
    """The encoder's test accuracy on a label and its binomial standard error."""
    top1 = run[label][ENCODER]
    return top1, ST.standard_error(top1, run[label]["n_test"])


def verdicts(runs: dict) -> dict:
    """{method: {label: {"per_seed": {seed: Difference as a dict}, "verdict": str}}} against I-JEPA,
    for every method with seed runs beside I-JEPA's on the same seeds."""
    baseline = seeds_of(runs, BASELINE)
    kept = {method: runs[sweep["kept"]] for method, sweep in sweeps(runs).items()}
    methods = sorted({name.split("-seed")[0] for name in runs if "-seed" in name and "-sweep-" not in name} - {BASELINE})
    out = {}
    for method in methods:
        mine = seeds_of(runs, method)
        if 0 not in mine and method in kept:  # the kept sweep setting was run on seed 0 at the same budget
            mine[0] = kept[method]
        shared = sorted(set(mine) & set(baseline))
        if not shared:
            continue
        out[method] = {}
        for label in LABELS:
            if not all(label in mine[s] and label in baseline[s] for s in shared):
                continue
            per_seed = {s: ST.compare(*accuracy_se(mine[s], label), *accuracy_se(baseline[s], label)) for s in shared}
            out[method][label] = {"per_seed": {s: vars(d) for s, d in per_seed.items()},
                                  "verdict": ST.seeds_agree(list(per_seed.values()))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="the JSON file of runs written by learning.py --record")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--measure", nargs="*", metavar="NAME", help="first measure these runs' encoders in full "
                    "(studies/features_vs_pixels.py: few labels, fine-tuning, depth, factors; I-JEPA's seed runs also "
                    "the baselines) and keep the numbers in the file; with no NAME, every run with a checkpoint on "
                    "disk and no measures yet")
    args = ap.parse_args(argv)
    if not os.path.exists(args.runs):
        print(f"methods.py: error: no file {args.runs}: record runs with benchmarks/learning.py --record {args.runs} "
              f"--name NAME", file=sys.stderr)
        return 1
    with open(args.runs) as f:
        runs = json.load(f)
    if args.measure is not None:
        unknown = set(args.measure) - set(runs)
        if unknown:
            print(f"methods.py: error: no runs named {sorted(unknown)} in {args.runs}", file=sys.stderr)
            return 1
        for name in args.measure or [n for n, r in runs.items() if "measures" not in r and r.get("checkpoint")
                                     and os.path.exists(r["checkpoint"])]:
            print(f"measuring {name} ({runs[name]['checkpoint']})", file=sys.stderr)
            runs[name]["measures"] = FV.measure_checkpoint(runs[name]["checkpoint"],
                                                           baselines=name.startswith(f"{BASELINE}-seed"))
            learning.record(args.runs, name, runs[name])  # kept run by run: a stopped measurement loses one run
    result = {"sweeps": sweeps(runs), "verdicts": verdicts(runs)}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for method, sweep in result["sweeps"].items():
        print(f"{method} sweep (seed 0), mean validation accuracy over the labels:")
        for name, val in sorted(sweep["runs"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:<40} {val:.3f}{'   <- kept' if name == sweep['kept'] else ''}")
    for method, labels in result["verdicts"].items():
        print(f"\n{method} against {BASELINE} (encoder test accuracy; compare: beyond 2 s.e. of the difference):")
        for label, v in labels.items():
            for seed, d in v["per_seed"].items():
                print(f"  {label:<9} seed {seed}: " + ST.Difference(**d).sentence(method, BASELINE, points=True))
            print(f"  {label:<9} verdict: {v['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
