"""What variable resolution and sequence packing buy: three regimes, one model, one image stream.

  A. fixed resolution: every image resized to the largest side, ordinary batches (the original
     code's regime);
  B. variable resolution, padded: each image at its random size, one image per row, every batch
     padded to its longest streams;
  C. variable resolution, packed: packing.py (several images per row, fixed shapes).

Step i of every regime trains on the same images: those the packer put into packed batch i (B
with the very same resized images and masks, A with them at the largest side). Images/s are of whole training steps (forward,
backward, AdamW, EMA), median over steps after warm-up, with the regimes' steps interleaved so
that any load on the machine hits all three alike. Memory per regime: on CUDA the peak allocated
over two steps in a fresh process; on a CPU, where the allocator keeps no peak, the tensors alive
when the backward pass starts (parameters, their gradients and AdamW state, and the activations
that autograd saved for backward, counted once per storage).

    python benchmarks/throughput.py                 # micro, patch 8, 32-96 px scenes
    python benchmarks/throughput.py --compile       # + the packed step under torch.compile
    python benchmarks/throughput.py --json          # last line: one JSON object
"""

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import models as M  # noqa: E402
import packing as P  # noqa: E402
from train import TrainConfig, make_optimizer, training_step  # noqa: E402


def new_model(args):
    torch.manual_seed(0)
    model = M.IJEPA(M.JEPAConfig(model=args.model, patch_size=args.patch)).to(args.device)
    return model, make_optimizer(model, TrainConfig())  # the optimiser training uses


def timed_step(model, opt, batch, device, forward=None) -> float:
    batch = batch.to(device)
    t0 = time.perf_counter()
    training_step(model, opt, batch, 0.996, forward=forward)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def peak_memory(args, batches) -> float:
    """MB of one regime's training step (see the module docstring for what is counted where)."""
    device = torch.device(args.device)
    model, opt = new_model(args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        for batch in batches[:2]:
            timed_step(model, opt, batch, device)
        return torch.cuda.max_memory_allocated() / 2**20
    timed_step(model, opt, batches[0], device)  # creates the gradients and the AdamW state
    state = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
             *(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state}

    def count(t):  # autograd hands over every tensor it keeps for the backward pass
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        model(batches[1].to(device))
    return sum(storages.values()) / 2**20


def compiled_run(args, batches) -> dict:
    """The packed step under torch.compile, interleaved with the eager step, in this (fresh)
    process. A counting backend tells how many graphs were compiled, at the first batch and after."""
    from torch._inductor import compile_fx

    device = torch.device(args.device)
    compiles = [0]

    def counting_backend(gm, example_inputs):  # called once per graph compiled
        compiles[0] += 1
        return compile_fx.compile_fx(gm, example_inputs)

    model, opt = new_model(args)
    eager_model, eager_opt = new_model(args)
    forward = torch.compile(model, backend=counting_backend)
    first = timed_step(model, opt, batches[0], device, forward)
    graphs_first = compiles[0]
    compiled, eager = [], []
    for batch in batches[1:]:
        compiled.append(len(batch.grids) / timed_step(model, opt, batch, device, forward))
        eager.append(len(batch.grids) / timed_step(eager_model, eager_opt, batch, device))
    return {"compile_s": first, "graphs_first": graphs_first, "recompiles": compiles[0] - graphs_first,
            "compiled": statistics.median(compiled), "eager": statistics.median(eager), "batches": len(batches) - 1}


def in_fresh_process(fn, *a):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, a)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="micro", choices=sorted(M.PRESETS))
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--masking", default="window", choices=sorted(M.MASKINGS))
    ap.add_argument("--side-range", type=int, nargs=2, default=(32, 96))
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--row-tokens", type=int, default=224, help="context + hidden slots per row")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per regime")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time the packed step under torch.compile")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.warmup + args.steps < 2:
        ap.error("--steps must be at least 1 and --warmup + --steps at least 2 (the memory count steps on one "
                 "batch and measures the next)")

    hi = args.side_range[1]
    masking = M.make_masking(args.masking)
    cfg = P.PackingConfig.balanced(masking, row_tokens=args.row_tokens, image_size=(hi, hi), patch_size=args.patch,
                                   side_range=tuple(args.side_range), max_area=hi * hi, rows=args.rows)
    n_compile = 20 if args.compile else 0
    want_batches = args.warmup + args.steps + n_compile

    # C: pack the stream until there are enough batches; each image's label is its stream index
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    sources, splits, packed = [], [], []
    packer = P.Packer(cfg)
    while len(packed) < want_batches:
        images = data.SceneDataset(256, resolution=hi, seed=len(splits)).tensors()[0]
        for x in images:
            sources.append(x)
            splits.append(P.prepare(x, cfg, masking, g, label=len(splits)))
            packed += packer.add(splits[-1])
    pack_s = time.perf_counter() - t0
    timed = packed[:args.warmup + args.steps]
    per_batch = round(statistics.mean(len(b.grids) for b in timed))

    # B: each packed batch's very images and masks, one per row, padded to the batch's longest
    padded = [M.MaskedBatch.padded([splits[i] for i in b.labels.tolist()]) for b in timed]
    # A: the same images, every one at the largest side (the scenes are rendered at it)
    fixed = [M.mask_images(torch.stack([P.resize(sources[i], (hi, hi)) for i in b.labels.tolist()]), args.patch, masking, g)
             for b in timed]

    # Speed: the three regimes step by step in turn, so that any load on the machine hits all alike
    device = torch.device(args.device)
    regimes = {"A": fixed, "B": padded, "C": timed}
    trainers = {k: new_model(args) for k in regimes}
    rates = {k: [] for k in regimes}
    for i in range(args.warmup + args.steps):
        for k, batches in regimes.items():
            dt = timed_step(*trainers[k], batches[i], device)
            if i >= args.warmup:
                rates[k].append(len(batches[i].grids) / dt)
    rate = {k: statistics.median(v) for k, v in rates.items()}
    peak = {k: in_fresh_process(peak_memory, args, batches[:2]) if device.type == "cuda" else peak_memory(args, batches[:2])
            for k, batches in regimes.items()}
    compiled = in_fresh_process(compiled_run, args, packed[-(1 + n_compile):]) if args.compile else None

    def slots(batches):  # every slot of both streams, padding included
        return sum(b.context_sample.numel() + b.hidden_sample.numel() for b in batches)

    def real(batches):
        return sum(int((b.context_sample >= 0).sum() + (b.hidden_sample >= 0).sum()) for b in batches)

    occ = real(timed) / slots(timed)
    padded_occ = real(padded) / slots(padded)
    fixed_occ = real(fixed) / slots(fixed)

    print(f"model {args.model}, patch {args.patch}, {args.masking} masking, sides {args.side_range[0]}-{hi} px, "
          f"device {args.device}, {torch.get_num_threads()} threads")
    print(f"packing: {cfg.rows} rows x ({cfg.context_len} context + {cfg.hidden_len} hidden) slots, "
          f"{per_batch} images per batch on average; packing {len(splits)} images took {pack_s:.1f} s "
          f"({len(splits) / pack_s:.0f} images/s, rendering included)")
    print(f"{'regime':<38}{'images/batch':>13}{'occupancy':>11}{'images/s':>10}{'memory MB':>11}")
    rows = [("A fixed resolution, ordinary batches", per_batch, fixed_occ, "A"),
            ("B variable resolution, padded", per_batch, padded_occ, "B"),
            ("C variable resolution, packed", per_batch, occ, "C")]
    for label, n, o, k in rows:
        print(f"{label:<38}{n:>13}{o:>11.3f}{rate[k]:>10.1f}{peak[k]:>11.0f}")
    print(f"speedup C/A: {rate['C'] / rate['A']:.2f}x   packing speedup C/B: {rate['C'] / rate['B']:.2f}x")
    summary = {"occupancy": round(occ, 4), "padded_occupancy": round(padded_occ, 4),
               "fixed_occupancy": round(fixed_occ, 4),
               "unpacked_images_per_s": round(rate["A"], 2), "padded_images_per_s": round(rate["B"], 2),
               "packed_images_per_s": round(rate["C"], 2), "speedup": round(rate["C"] / rate["A"], 3),
               "packing_speedup": round(rate["C"] / rate["B"], 3),
               "peak_mb": {k: round(v, 1) for k, v in peak.items()},
               "images_per_batch": per_batch, "steps": args.steps, "device": args.device}
    if compiled:
        c = compiled
        print(f"torch.compile, packed: first step (compiling) {c['compile_s']:.1f} s, {c['graphs_first']} graph(s); "
              f"{c['batches']} later batches of different image mixes: {c['recompiles']} recompiles; "
              f"{c['compiled']:.1f} images/s vs {c['eager']:.1f} eager, interleaved ({c['compiled'] / c['eager']:.2f}x)")
        summary.update({"compile_s": round(c["compile_s"], 1), "recompiles": c["recompiles"],
                        "compiled_images_per_s": round(c["compiled"], 2), "eager_images_per_s_same_run": round(c["eager"], 2)})
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
