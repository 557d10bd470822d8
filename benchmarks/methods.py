"""Why predict features? I-JEPA against MAE and a SIGReg JEPA: the runs, and the rules that judge them.

The runs file (R = benchmarks/results/methods.json) holds each run's probe of teacher, student and
random init on `shape`, `count` and `distance`, the command that made it, its training curve and,
for every seed run, every number of `studies/features_vs_pixels.py` (few labels, fine-tuning,
depth, factors), measured as soon as the run is trained, so that a record is whole when it lands and
outlives its checkpoint. `--run` makes the runs R lacks (`run_study`): I-JEPA's demo recipe on
seeds 0 and 1 (the normalisation study's runs, trained if missing), the SWEEPS on seed 0, then seeds
0 and 1 of each method's kept setting, and pixel targets under I-JEPA's own masks (`--method
pixels`, the I-JEPA paper's Table 7) on both. The budget is wall-clock time: a setting's first run
trains for M minutes, I-JEPA's demo time on the same machine (MAE's encoder sees a quarter of the
tokens, so it takes more steps in M; a SIGReg step costs several of I-JEPA's, so it takes fewer).
Its other seeds train the number of steps it reached, which is the same budget on any machine and
under any load. (The sweep runs of the committed file took 14.2 minutes each, I-JEPA's demo time
on an earlier, faster machine; their own speeds, matched by the runs made here, show that the
machine they ran on took about 21.6 minutes for the demo, so the sweeps had about two thirds of the
budget, all alike. They only choose the setting; the seed runs have the whole budget.) A run made
by `benchmarks/learning.py --record R --name NAME --out DIR` is read the same way. The rules, stated before the numbers:

  1. A sweep per method, on seed 0: each setting of the method's own knob (MAE: --mask-ratio and
     the decoder's depth; SIGReg: its weight) is a run named "<method>-sweep-<anything>". The
     setting kept is the one with the best validation accuracy of its encoder (the probe's best
     layer, on the validation fifth of the probe's training scenes), averaged over the labels:
     never the test accuracy.
  2. The seeds: the kept setting, and I-JEPA, run over seeds 0 and 1 ("<method>-seed<k>",
     "ijepa-seed<k>"; a sweep run never stands as a seed: it may have had another budget).
     Each method's encoder (I-JEPA's teacher, the encoder the paper probes; the others have one
     encoder) is compared with I-JEPA's on each label by `evaluation.stats.compare` (beyond 2
     standard errors of the difference).
  3. A verdict per label counts only when both seeds agree: "better" or "worse" on both; anything
     else is "no difference the seeds agree on".

    python benchmarks/methods.py R --run                # make what R lacks (20-30 minutes a run on 2 cores), then judge
    python benchmarks/methods.py R --run 14.2           # the same, the first run of a setting trained for 14.2 minutes
    python benchmarks/methods.py R --measure            # measure every run whose checkpoint is on disk, then judge
    python benchmarks/methods.py R                      # the sweeps, the seeds, the verdicts
    python benchmarks/methods.py R --json               # the same as JSON
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import evaluation.stats as ST  # noqa: E402
import studies.features_vs_pixels as FV  # noqa: E402
import train as T  # noqa: E402
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


def compared_methods(runs: dict) -> list:
    """The methods with seed runs beside I-JEPA's, in name order."""
    return sorted({name.split("-seed")[0] for name in runs if "-seed" in name and "-sweep-" not in name} - {BASELINE})


def verdicts(runs: dict) -> dict:
    """{method: {label: {"per_seed": {seed: Difference as a dict}, "verdict": str}}} against I-JEPA,
    for every method with seed runs beside I-JEPA's on the same seeds."""
    baseline = seeds_of(runs, BASELINE)
    out = {}
    for method in compared_methods(runs):
        mine = seeds_of(runs, method)
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


def fine_tune_gains(runs: dict, method: str = "mae") -> dict:
    """Claim (b), MAE closes the gap when fine-tuned: {label: {"per_seed": {seed: Difference as a
    dict}, "verdict": str}}, where each Difference sets `method`'s gain from fine-tuning the last
    block (its fine-tuned top-1 minus its frozen linear probe's, both on the same test scenes)
    against I-JEPA's, on every seed both have measured. "better": fine-tuning helps `method` more."""
    def gain(run, label):  # (gain, its standard error: the two accuracies' errors combined)
        tuned, frozen = run["measures"]["fine_tune"][label], run["measures"]["linear"][label]
        return tuned["top1"] - frozen["best_top1"], float(np.hypot(tuned["stderr"], frozen["stderr"]))

    def tuned(run):  # measured, with the fine-tuning
        return "fine_tune" in run.get("measures", {})

    mine = {s: r for s, r in seeds_of(runs, method).items() if tuned(r)}
    baseline = {s: r for s, r in seeds_of(runs, BASELINE).items() if tuned(r)}
    shared = sorted(set(mine) & set(baseline))
    out = {}
    for label in LABELS:
        if not shared or not all(label in mine[s]["measures"]["fine_tune"] for s in shared):
            continue
        per_seed = {s: ST.compare(*gain(mine[s], label), *gain(baseline[s], label)) for s in shared}
        out[label] = {"per_seed": {s: vars(d) for s, d in per_seed.items()}, "verdict": ST.seeds_agree(list(per_seed.values()))}
    return out


# The study's runs. The sweeps, on seed 0: each setting of each method's main knob, trained for `minutes`
# of wall-clock time. Seeds 0 and 1 then run the setting kept (`sweeps`).
SWEEPS = {
    "mae-sweep-r0.6": {"method": "mae", "loss": "mse", "mask_ratio": 0.6},
    "mae-sweep-r0.75": {"method": "mae", "loss": "mse", "mask_ratio": 0.75},
    "mae-sweep-r0.75-d1": {"method": "mae", "loss": "mse", "mask_ratio": 0.75, "predictor_depth": 1},
    "sigreg-sweep-w0.02": {"method": "sigreg", "sigreg_weight": 0.02},
    "sigreg-sweep-w0.05": {"method": "sigreg", "sigreg_weight": 0.05},
    "sigreg-sweep-w0.1": {"method": "sigreg", "sigreg_weight": 0.1},
}
# I-JEPA: the demo recipe, whose runs of seeds 0 and 1 the normalisation study keeps (Loss_Maps.ipynb)
IJEPA_RUNS = "checkpoints/norm-study/layernorm-seed{seed}"
# Pixel targets under I-JEPA's own masks and predictor (the I-JEPA paper's Table 7 ablation): no knob of
# its own to sweep, seeds 0 and 1
PIXELS = {"method": "pixels", "loss": "mse"}


def train_flags(fields: dict) -> list:
    """TrainConfig fields -> the train.py flags that set them: {"mask_ratio": 0.6, "flip": False,
    "ema": (0.998, 1.0)} -> ["--mask-ratio 0.6", "--no-flip", "--ema 0.998 1.0"]."""
    flags = []
    for key, value in fields.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            flags.append(f"{flag} {' '.join(map(str, value))}")
        else:
            flags.append(f"{flag} {value}")
    return flags


CURVE_POINTS = 120  # (seconds, loss) rows kept of each run's log: enough for one curve on a time axis


def training_curve(folder: str, points: int = CURVE_POINTS) -> dict:
    """{"seconds": [...], "loss": [...]}: a run's log thinned to at most `points` evenly spaced
    logged steps, the last always kept, so that the study's curves outlive its checkpoints."""
    log = T.read_log(folder)
    kept = log[::-(-len(log) // points)]
    if kept[-1] is not log[-1]:
        kept = kept[:-1] + [log[-1]]
    return {"seconds": [round(row["seconds"], 1) for row in kept], "loss": [round(row["loss"], 5) for row in kept]}


def run_study(results: str, runs_dir: str, minutes: float | None = None, base=None, probe=(4000, 2000), ijepa_runs=IJEPA_RUNS,
              ijepa_steps: int = T.DEMO_STEPS, measure: bool = True, progress: bool = True, **sizes) -> dict:
    """Make every run of the study that `results` (the runs file) lacks, and return the file's runs:
    I-JEPA's two seeds (the demo recipe, `ijepa_steps` long, trained into `ijepa_runs` if missing),
    the SWEEPS on seed 0 (each for `minutes` into runs_dir/NAME), then seeds 0 and 1 of each method's
    kept setting, then pixel targets under I-JEPA's masks (PIXELS). The sweep only chooses: each
    method's seed 0 is a run of its own, trained for `minutes` on the machine where I-JEPA's demo
    took that long; its seed 1 trains the number of steps seed 0 reached, which is the same budget
    on any machine and under any load, and can be trained in segments. Each run is probed
    (`learning.probe_table`, no pixels) and recorded with its command and training curve; with
    `measure`, every seed run is also measured in full (`measure_runs`; `sizes`: measure_checkpoint's
    sizes) before the next run starts, so each record is whole when it lands and a lost checkpoint
    loses nothing. `base`: TrainConfig fields every run shares (small runs for the notebook's quick
    mode). A run already in the file is not made again."""
    base = base or {}
    runs = {}
    if os.path.exists(results):
        with open(results) as f:
            runs = json.load(f)

    def make(name, changes, seed, steps=None, out=None):
        if name not in runs:
            out = out or os.path.join(runs_dir, name)
            length = {"steps": steps} if steps else {"minutes": minutes}
            cfg = T.TrainConfig(seed=seed, **length, **base, **changes)
            checkpoint = T.checkpoint_or_train(os.path.join(out, "checkpoint.pt"), cfg)
            trained = T.load_checkpoint(checkpoint)
            _, table = learning.probe_table(checkpoint, "scenes", *probe, pixels=False, progress=progress)
            command = " ".join(["python train.py", *train_flags({**base, **changes, "seed": seed, **length, "out": out})])
            runs[name] = {**learning.summarise(table, 0.0, trained["seconds"], trained["step"], trained["total_steps"]),
                          "method": cfg.method, "changes": changes, "seed": seed, "checkpoint": checkpoint,
                          "command": command, "curve": training_curve(out)}
            learning.record(results, name, runs[name])
        if measure and "-sweep-" not in name:
            measure_runs(results, runs, [name], **sizes)

    for seed in (0, 1):
        make(f"{BASELINE}-seed{seed}", {}, seed, steps=ijepa_steps, out=ijepa_runs.format(seed=seed))
    minutes = minutes or runs[f"{BASELINE}-seed0"]["train_minutes"]  # I-JEPA's demo time, where it was trained
    for name, changes in SWEEPS.items():
        make(name, changes, 0)
    for method, sweep in sweeps(runs).items():
        changes = runs[sweep["kept"]]["changes"]
        make(f"{method}-seed0", changes, 0)
        make(f"{method}-seed1", changes, 1, steps=runs[f"{method}-seed0"]["steps"])
    make("pixels-seed0", PIXELS, 0)
    make("pixels-seed1", PIXELS, 1, steps=runs["pixels-seed0"]["steps"])
    return runs


def measure_runs(results: str, runs: dict, names=None, **sizes) -> None:
    """Measure in full (`features_vs_pixels.measure_checkpoint`) the runs `names` (default: every run
    with a checkpoint on disk), I-JEPA's seed runs with the baselines, and keep each in the file as
    soon as it is measured. A run already measured, or whose checkpoint is not on disk, is skipped.
    `sizes`: measure_checkpoint's (n_train, draws, ...)."""
    for name in names or list(runs):
        run = runs[name]
        if "measures" in run or not (run.get("checkpoint") and os.path.exists(run["checkpoint"])):
            continue
        print(f"measuring {name} ({run['checkpoint']})", file=sys.stderr)
        run["measures"] = FV.measure_checkpoint(run["checkpoint"], baselines=name.startswith(f"{BASELINE}-seed"), **sizes)
        learning.record(results, name, run)  # kept run by run: a stopped measurement loses one run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="the JSON file of runs written by learning.py --record")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--run", type=float, nargs="?", const=0.0, metavar="MINUTES", help="first make the runs the file "
                    "lacks (run_study); a setting's first run trains for MINUTES (default: I-JEPA's seed-0 demo time "
                    "as recorded in the file), its other seeds as many steps as it reached")
    ap.add_argument("--runs-dir", default="checkpoints/methods", help="where --run keeps each run's checkpoint")
    ap.add_argument("--measure", nargs="*", metavar="NAME", help="first measure these runs' encoders in full "
                    "(studies/features_vs_pixels.py: few labels, fine-tuning, depth, factors; I-JEPA's seed runs also "
                    "the baselines) and keep the numbers in the file; with no NAME, every run with a checkpoint on "
                    "disk and no measures yet")
    args = ap.parse_args(argv)
    if args.run is not None:
        run_study(args.runs, args.runs_dir, args.run)
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
        measure_runs(args.runs, runs, args.measure)
    result = {"sweeps": sweeps(runs), "verdicts": verdicts(runs), "fine_tune_gains": fine_tune_gains(runs)}
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
    if result["fine_tune_gains"]:
        print(f"\nwhat fine-tuning the last block adds, mae against {BASELINE} (claim b: 'better' = it helps MAE more):")
        for label, v in result["fine_tune_gains"].items():
            for seed, d in v["per_seed"].items():
                print(f"  {label:<9} seed {seed}: " + ST.Difference(**d).sentence("mae", BASELINE, points=True))
            print(f"  {label:<9} verdict: {v['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
