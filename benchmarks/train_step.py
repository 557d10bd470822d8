"""Images/s of one full I-JEPA training step, and how close it comes to the machine's limit.

One step = student on the context, teacher on the whole image, feature norm, predictor, loss,
backward, AdamW step, EMA update of the teacher. Batches (masks drawn, tokens laid out) are
built before the clock starts; their cost is printed separately.

Speeds move by 2.5x between machines and torch versions, so the script also measures, in the same
run, what it can compare against on any machine: the model FLOPs of one step (counted by
torch.utils.flop_counter: matrix products and attention, forward and backward, padding slots
included since the step computes them), the FLOP/s the step achieves, and the FLOP/s of a large
float32 matrix product on the same machine, its practical limit.

    python benchmarks/train_step.py                       # tiny, 96 px, patch 8, batch 16
    python benchmarks/train_step.py --model micro --size 64 --batch 64
"""

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import models as M  # noqa: E402
from train import param_groups, training_step  # noqa: E402


def step_flops(model, opt, batch) -> int:
    """Model FLOPs of one training step, counted while running it (on a copy: the real model and
    optimiser are not stepped)."""
    model, opt_copy = copy.deepcopy(model), torch.optim.AdamW(param_groups(model), lr=1e-4)
    with FlopCounterMode(display=False) as counter:
        training_step(model, opt_copy, batch, momentum=0.996)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=sorted(M.PRESETS))
    ap.add_argument("--size", type=int, default=96, help="image side in pixels")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--masking", default="multiblock", choices=sorted(M.MASKINGS))
    ap.add_argument("--predictor-dim", type=int, default=384)
    ap.add_argument("--predictor-depth", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--matmul-size", type=int, default=2048, help="side of the matrix product that measures the limit")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = M.JEPAConfig(model=args.model, patch_size=args.patch, predictor_dim=args.predictor_dim,
                       predictor_depth=args.predictor_depth)
    model = M.IJEPA(cfg)
    opt = torch.optim.AdamW(param_groups(model), lr=1e-4, weight_decay=0.04)
    g = torch.Generator().manual_seed(0)
    masking = M.make_masking(args.masking)

    t0 = time.perf_counter()
    batches = [M.mask_images(torch.rand(args.batch, 3, args.size, args.size), args.patch, masking, g)
               for _ in range(args.warmup + args.steps)]
    build_s = (time.perf_counter() - t0) / len(batches)

    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        training_step(model, opt, batch, momentum=0.996)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)

    step_s = statistics.median(times)
    flops = step_flops(model, opt, batches[0])
    limit = matmul_flops_per_s(args.matmul_size)
    n_params = sum(p.numel() for p in model.student.parameters()) + sum(p.numel() for p in model.predictor.parameters())
    print(f"config: {args.model} ({cfg.encoder_config().dim} wide, {cfg.encoder_config().depth} blocks), "
          f"{args.size} px, patch {args.patch}, batch {args.batch}, {args.masking} masking, "
          f"predictor {args.predictor_depth}x{args.predictor_dim}; {n_params / 1e6:.1f} M trainable parameters")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"tokens per image: context {float((batches[0].context_sample >= 0).sum(1).float().mean()):.1f}, "
          f"predicted {float(batches[0].is_target.sum(1).float().mean()):.1f}, whole image {(args.size // args.patch) ** 2}")
    print(f"step seconds: median {step_s:.3f} over {len(times)} steps (min {min(times):.3f}, max {max(times):.3f})")
    print(f"batch building (masks + layout), not timed above: {build_s * 1000:.0f} ms per batch")
    print(f"images/s: {args.batch / step_s:.2f}")
    print(f"model FLOPs per step: {flops / 1e9:.2f} GFLOP (forward + backward, counted)")
    print(f"achieved: {flops / step_s / 1e9:.1f} GFLOP/s; float32 {args.matmul_size}^2 matmul on this machine: "
          f"{limit / 1e9:.1f} GFLOP/s; the step reaches {flops / step_s / limit:.0%} of it")


if __name__ == "__main__":
    main()
