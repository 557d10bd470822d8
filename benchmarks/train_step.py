"""Images/s of one full I-JEPA training step, and how close it comes to the machine's limit.

One step = student on the context, teacher on the whole image, feature norm, predictor, loss,
backward, AdamW step, EMA update of the teacher. Batches (masks drawn, tokens laid out) are
built before the clock starts; their cost is printed separately.

Speeds move by 2.5x between machines and torch versions, and by 20% from minute to minute on a
shared machine, so the script measures side by side, in one run, what it compares:
  - the model FLOPs of one step, counted by torch.utils.flop_counter: matrix products and
    attention, forward and backward, padding slots included where the step computes them. (The
    counter does not know the CPU flash-attention kernel that `F.scaled_dot_product_attention`
    runs on a CPU; `FLOP_FORMULAS` gives it torch's own formulas for the other attention kernels);
  - the FLOP/s that the step achieves, and that of a large float32 matrix product on the same
    machine, its practical limit; the step's share of that limit carries across machines;
  - with --compare, the same step of another version of this code (a git revision or a folder);
    with --official, the official I-JEPA code's step (a checkout of facebookresearch/ijepa: its
    encoder, predictor and mask collator, run the way its src/train.py runs them, in float32).

Each code runs in a process of its own, created before any timing; the processes take turns, a
few steps each, for --rounds rounds, and only one runs at a time, so that a slow minute of the
machine hits every code alike. The matrix product is timed between the turns.

    python benchmarks/train_step.py                           # tiny, 96 px, patch 8, batch 16
    python benchmarks/train_step.py --compare 7275c67         # beside an earlier version
    python benchmarks/train_step.py --official ~/ijepa        # beside the official code
    python benchmarks/train_step.py --profile                 # where the step's time goes
    python benchmarks/train_step.py --model micro --size 64 --batch 128 \\
        --predictor-dim 64 --predictor-depth 3 --compare 7275c67   # the demo recipe's step
"""

import argparse
import copy
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMA_MOMENTUM = 0.996


def attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU flash-attention kernel, forward (shapes in, as FlopCounterMode passes them)."""
    return flop_counter.sdpa_flop_count(query, key, value)


def attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# torch.utils.flop_counter counts the attention kernels of CUDA but not the one a CPU runs: these
# are torch's own formulas for the others
FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops,
}


def count_flops(run) -> int:
    """Model FLOPs of calling `run()`: matrix products and attention, forward and backward."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        run()
    return counter.get_total_flops()


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matrix product (2 n^3 FLOPs), median of `repeats` after one warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


# -----------------------------------------------------------------------------------------------
# The steps that are timed: this repository's (from any version of it) and the official code's


class RepositoryStep:
    """This repository's training step, with `models` and `train` imported from `code` (this
    checkout or another version of it)."""

    def __init__(self, code: str, args):
        sys.path.insert(0, code)
        import models as M
        from train import TrainConfig, make_optimizer, training_step
        self.training_step = training_step
        self.make_optimizer = lambda model: make_optimizer(model, TrainConfig())  # the optimiser training uses
        torch.manual_seed(0)
        cfg = M.JEPAConfig(model=args.model, patch_size=args.patch, predictor_dim=args.predictor_dim,
                           predictor_depth=args.predictor_depth)
        self.model = M.IJEPA(cfg)
        self.optimizer = self.make_optimizer(self.model)
        g, masking = torch.Generator().manual_seed(0), M.make_masking(args.masking)
        t0 = time.perf_counter()
        self.batches = [M.mask_images(torch.rand(args.batch, 3, args.size, args.size), args.patch, masking, g)
                        for _ in range(args.batches)]
        self.build_s = (time.perf_counter() - t0) / args.batches
        first = self.batches[0]
        self.tokens = {"context": float((first.context_sample >= 0).sum(1).float().mean()),
                       "predicted": float(first.is_target.sum(1).float().mean())}
        self.parameters = (sum(p.numel() for p in self.model.student.parameters())
                           + sum(p.numel() for p in self.model.predictor.parameters()))

    def step(self, i: int) -> None:
        self.training_step(self.model, self.optimizer, self.batches[i % len(self.batches)], momentum=EMA_MOMENTUM)

    def flops(self) -> int:
        """Counted on a copy, so that the timed model and optimiser are not stepped."""
        model = copy.deepcopy(self.model)
        return count_flops(lambda: self.training_step(model, self.make_optimizer(model), self.batches[0],
                                                      momentum=EMA_MOMENTUM))


OFFICIAL_ENCODERS = {"tiny": "vit_tiny", "small": "vit_small", "base": "vit_base"}


class OfficialStep:
    """The official code's training step (its src/train.py: target encoder on the whole image,
    layer norm, the predicted blocks cut out of it; encoder on the context; predictor once per
    target block; smooth-L1; AdamW; the EMA as it writes it), built from its own modules in
    `code`, with this script's sizes and the multi-block scales of this repository's masking."""

    def __init__(self, code: str, args):
        sys.path.insert(0, code)
        from src.masks.multiblock import MaskCollator
        from src.masks.utils import apply_masks
        from src.models import vision_transformer as vit
        from src.utils.tensors import repeat_interleave_batch
        self.apply_masks, self.repeat_interleave_batch = apply_masks, repeat_interleave_batch
        torch.manual_seed(0)
        self.encoder = getattr(vit, OFFICIAL_ENCODERS[args.model])(img_size=[args.size], patch_size=args.patch)
        self.predictor = vit.vit_predictor(num_patches=self.encoder.patch_embed.num_patches,
                                           embed_dim=self.encoder.embed_dim, predictor_embed_dim=args.predictor_dim,
                                           depth=args.predictor_depth, num_heads=self.encoder.num_heads)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.optimizer = self.make_optimizer()
        collator = MaskCollator(input_size=(args.size, args.size), patch_size=args.patch, enc_mask_scale=(0.85, 1.0),
                                pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4,
                                min_keep=10, allow_overlap=False)
        t0 = time.perf_counter()
        self.batches = [collator([(torch.rand(3, args.size, args.size), 0) for _ in range(args.batch)])
                        for _ in range(args.batches)]
        self.build_s = (time.perf_counter() - t0) / args.batches
        _, masks_enc, masks_pred = self.batches[0]
        self.tokens = {"context": float(masks_enc[0].shape[1]),  # its collator cuts every mask to the batch's shortest
                       "predicted": float(sum(m.shape[1] for m in masks_pred))}
        self.parameters = sum(p.numel() for p in [*self.encoder.parameters(), *self.predictor.parameters()])

    def make_optimizer(self):
        """AdamW with weight decay on matrices only, as its src/helper.py groups the parameters."""
        named = [*self.encoder.named_parameters(), *self.predictor.named_parameters()]
        decay = [p for n, p in named if "bias" not in n and p.ndim != 1]
        no_decay = [p for n, p in named if "bias" in n or p.ndim == 1]
        return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                 lr=1e-4, weight_decay=0.04)

    def step(self, i: int) -> None:
        imgs, masks_enc, masks_pred = self.batches[i % len(self.batches)]
        imgs = imgs[0]  # the collated (images, labels)
        with torch.no_grad():
            h = self.target_encoder(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            h = self.apply_masks(h, masks_pred)
            h = self.repeat_interleave_batch(h, len(imgs), repeat=len(masks_enc))
        z = self.predictor(self.encoder(imgs, masks_enc), masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z, h)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            for q, k in zip(self.encoder.parameters(), self.target_encoder.parameters()):
                k.data.mul_(EMA_MOMENTUM).add_((1.0 - EMA_MOMENTUM) * q.detach().data)

    def flops(self) -> int:
        saved = [copy.deepcopy(m.state_dict()) for m in (self.encoder, self.predictor, self.target_encoder)]
        optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        flops = count_flops(lambda: self.step(0))
        for m, state in zip((self.encoder, self.predictor, self.target_encoder), saved):
            m.load_state_dict(state)
        self.optimizer.load_state_dict(optimizer_state)
        return flops


STEPS = {"repository": RepositoryStep, "official": OfficialStep}


def serve(kind: str, code: str, args) -> None:
    """A worker process: build the step, then answer the commands the main process writes, one
    JSON line each: `time N` (N steps, their seconds), `flops`, `quit`."""
    step = STEPS[kind](code, args)
    for i in range(args.warmup):
        step.step(i)
    done = args.warmup
    print(json.dumps({"tokens": step.tokens, "build_s": step.build_s, "parameters": step.parameters}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "time":
            times = []
            for _ in range(int(command[1])):
                t0 = time.perf_counter()
                step.step(done)
                times.append(time.perf_counter() - t0)
                done += 1
            print(json.dumps(times), flush=True)
        elif command[0] == "flops":
            print(json.dumps(step.flops()), flush=True)
        else:
            return


# -----------------------------------------------------------------------------------------------
# The main process: one worker per code, taking turns


class Worker:
    def __init__(self, name: str, kind: str, code: str, config_args: list):
        self.name = name
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", kind, "--code", code,
                                         *config_args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self.read()
        self.times = []

    def ask(self, command: str):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def read(self):
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the worker for {self.name} stopped (its error is printed above)")
        return json.loads(line)

    def close(self):
        if self.process.poll() is None:  # still running
            self.process.communicate("quit\n")


def checkout(revision: str, into: str) -> str:
    """A folder holding `revision` of this repository: the folder itself if it is one, else the
    revision's files extracted into `into` (git archive)."""
    if os.path.isdir(revision):
        return os.path.abspath(revision)
    archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", revision], capture_output=True, check=False)
    if archive.returncode:
        raise SystemExit(f"--compare {revision!r}: neither a folder nor a git revision of {REPO} "
                         f"({archive.stderr.decode().strip()})")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def run(args, config_args: list) -> dict:
    """Time every code side by side; returns the measurements (also what --json writes)."""
    with tempfile.TemporaryDirectory() as tmp:
        codes = [("this checkout", "repository", REPO)]
        if args.compare:
            codes.append((f"--compare {args.compare}", "repository", checkout(args.compare, tmp)))
        if args.official:
            if args.model not in OFFICIAL_ENCODERS:
                raise SystemExit(f"--official: the official code has no {args.model!r} encoder; "
                                 f"use --model {' or '.join(OFFICIAL_ENCODERS)}")
            if not os.path.isdir(os.path.join(args.official, "src", "models")):
                raise SystemExit(f"--official {args.official!r}: expected a checkout of facebookresearch/ijepa "
                                 f"(a folder with src/models/vision_transformer.py)")
            codes.append(("official code", "official", os.path.abspath(args.official)))
        workers = [Worker(name, kind, code, config_args) for name, kind, code in codes]
        try:
            limits = []
            for _ in range(args.rounds):
                for w in workers:
                    w.times += w.ask(f"time {args.steps}")
                limits.append(matmul_flops_per_s(args.matmul_size))
            flops = [w.ask("flops") for w in workers]
        finally:
            for w in workers:
                w.close()
    limit = statistics.median(limits)
    rows = []
    for w, f in zip(workers, flops):
        step_s = statistics.median(w.times)
        rows.append({"code": w.name, "step_s": step_s, "min_s": min(w.times), "max_s": max(w.times),
                     "steps": len(w.times), "images_per_s": args.batch / step_s, "gflop_per_step": f / 1e9,
                     "gflop_per_s": f / step_s / 1e9, "share_of_matmul": f / step_s / limit, **w.info})
    return {"command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                       f"torch {torch.__version__}",
            "matmul_gflop_per_s": limit / 1e9, "matmul_gflop_per_s_each_round": [x / 1e9 for x in limits],
            "rows": rows}


def report(args, result: dict) -> None:
    print(f"config: {args.model}, {args.size} px, patch {args.patch}, batch {args.batch}, {args.masking} masking, "
          f"predictor {args.predictor_depth}x{args.predictor_dim}; whole image {(args.size // args.patch) ** 2} tokens")
    print(f"machine: {result['machine']}")
    print(f"float32 {args.matmul_size}^2 matmul: {result['matmul_gflop_per_s']:.1f} GFLOP/s (median of "
          f"{len(result['matmul_gflop_per_s_each_round'])} rounds, "
          f"{min(result['matmul_gflop_per_s_each_round']):.1f}-{max(result['matmul_gflop_per_s_each_round']):.1f})")
    for r in result["rows"]:
        print(f"\n{r['code']}: {r['parameters'] / 1e6:.1f} M trainable parameters; tokens per image: "
              f"context {r['tokens']['context']:.1f}, predicted {r['tokens']['predicted']:.1f}")
        print(f"  step seconds: median {r['step_s']:.3f} over {r['steps']} steps (min {r['min_s']:.3f}, max {r['max_s']:.3f})")
        print(f"  batch building (masks + layout), not timed above: {r['build_s'] * 1000:.0f} ms per batch")
        print(f"  images/s: {r['images_per_s']:.2f}")
        print(f"  model FLOPs per step: {r['gflop_per_step']:.2f} GFLOP (forward + backward, counted)")
        print(f"  achieved: {r['gflop_per_s']:.1f} GFLOP/s; the step reaches {100 * r['share_of_matmul']:.0f}% "
              f"of the matmul's")
    first = result["rows"][0]
    for r in result["rows"][1:]:
        print(f"\nthis checkout against {r['code']}: {first['images_per_s'] / r['images_per_s']:.2f}x the images/s, "
              f"{first['gflop_per_step'] / r['gflop_per_step']:.2f}x the FLOPs per step, "
              f"{first['share_of_matmul'] / r['share_of_matmul']:.2f}x the share of the matmul")


OP_GROUPS = {  # how --profile sums torch.profiler's operators
    "matrix products (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention kernel, forward and backward": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                               "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
}


def profile(args) -> None:
    """Where this checkout's step spends its time: torch.profiler over --steps steps after the
    warm-up, the operators' own time summed into the groups of OP_GROUPS, then the rest one by one."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    step = RepositoryStep(REPO, args)
    for i in range(args.warmup):
        step.step(i)
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.steps):
            step.step(args.warmup + i)
    wall = (time.perf_counter() - t0) / args.steps
    ops = {e.key: e.self_cpu_time_total / 1e6 / args.steps for e in prof.key_averages()}  # seconds per step
    total = sum(ops.values())
    print(f"this checkout's step, profiled over {args.steps} steps: {wall:.3f} s per step "
          f"({total:.3f} s in operators)")
    for group, names in OP_GROUPS.items():
        seconds = sum(ops.pop(name, 0.0) for name in names)
        print(f"  {seconds:7.3f} s {100 * seconds / total:5.1f}%  {group}")
    for name, seconds in sorted(ops.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {seconds:7.3f} s {100 * seconds / total:5.1f}%  {name}")
    rest = sum(seconds for _, seconds in sorted(ops.items(), key=lambda kv: -kv[1])[12:])
    print(f"  {rest:7.3f} s {100 * rest / total:5.1f}%  every other operator")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config = ap.add_argument_group("the step's configuration (every code runs the same)")
    config.add_argument("--model", default="tiny", help="a preset of models.PRESETS")
    config.add_argument("--size", type=int, default=96, help="image side in pixels")
    config.add_argument("--patch", type=int, default=8)
    config.add_argument("--batch", type=int, default=16)
    config.add_argument("--masking", default="multiblock", help="a key of models.MASKINGS (this repository only)")
    config.add_argument("--predictor-dim", type=int, default=384)
    config.add_argument("--predictor-depth", type=int, default=6)
    config.add_argument("--batches", type=int, default=8, help="distinct batches, used in turn")
    config.add_argument("--warmup", type=int, default=2, help="untimed steps of each code before the first round")
    ap.add_argument("--steps", type=int, default=4, help="timed steps of each code per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--matmul-size", type=int, default=2048, help="side of the matrix product that measures the limit")
    ap.add_argument("--compare", help="another version of this repository: a git revision or a folder")
    ap.add_argument("--official", help="a checkout of the official code (github.com/facebookresearch/ijepa)")
    ap.add_argument("--json", help="also write the measurements, with this command, to this file")
    ap.add_argument("--profile", action="store_true", help="instead: where this checkout's step spends its time")
    ap.add_argument("--serve", choices=sorted(STEPS), help=argparse.SUPPRESS)  # a worker process (`serve`)
    ap.add_argument("--code", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve, args.code, args)
    if args.profile:
        return profile(args)
    config_args = [a for action in config._group_actions
                   for a in (action.option_strings[0], str(getattr(args, action.dest)))]
    result = run(args, config_args)
    report(args, result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
