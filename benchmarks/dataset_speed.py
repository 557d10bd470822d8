"""
How fast does the built-in scene dataset render on this machine?

    python benchmarks/dataset_speed.py              # 64 px and 128 px, shadows on and off
    python benchmarks/dataset_speed.py --json       # ... and one JSON object on the last line
    python benchmarks/dataset_speed.py --compile    # also torch.compile the ray caster (minutes to compile;
                                                    # on 2 CPU cores it was no faster than eager: the
                                                    # data-dependent steps break the graph into pieces)

Each number is the median of several timed calls of render_scenes() on fresh indices (so nothing is
cached) after one warm-up call. Run it on an otherwise idle machine: with 2 cores, another busy
process makes torch's worker threads wait for each other and the numbers collapse (by 10x or more).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


def busy_cpus(seconds=1.0):
    """How many CPUs other processes keep busy right now (Linux /proc/stat; None elsewhere)."""
    def snapshot():
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait
    try:
        (total0, idle0), _, (total1, idle1) = snapshot(), time.sleep(seconds), snapshot()
    except OSError:
        return None
    return os.cpu_count() * (1 - (idle1 - idle0) / max(1, total1 - total0))


def images_per_s(core, size, batch, repeats, config):
    eager, data._render = data._render, core  # render_scenes() = numpy layout + this torch-only core
    try:
        data.render_scenes(range(batch), size, size, config=config)    # warm-up (and compilation)
        times = []
        for r in range(1, repeats + 1):
            start = time.perf_counter()
            data.render_scenes(range(r * batch, (r + 1) * batch), size, size, config=config)
            times.append(time.perf_counter() - start)
    finally:
        data._render = eager
    return batch / statistics.median(times), batch / min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd ray caster")
    args = parser.parse_args()

    busy = busy_cpus()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
          + (f", {busy:.1f} CPUs busy before the start" if busy is not None else "")
          + (" (other work is running: the numbers will be low)" if busy and busy > 0.3 else ""))
    renderers = {"eager": data._render}
    if args.compile:  # dynamic shapes: the number of candidate rays changes from batch to batch
        renderers["compiled"] = torch.compile(data._render, dynamic=True)
    results = {}
    for name, render in renderers.items():
        for size in (64, 128):
            for shadows in (True, False):
                if name == "compiled" and (size, shadows) != (64, True):
                    continue  # each size and setting compiles anew: minutes on 2 cores
                config = data.SceneConfig(shadows=shadows)
                rate, best = images_per_s(render, size, args.batch, args.repeats, config)
                key = f"images_per_s_{size}" + ("" if shadows else "_no_shadows") + ("" if name == "eager" else "_compiled")
                results[key] = round(rate, 1)
                print(f"{name:8s} {size:3d} px  shadows {'on ' if shadows else 'off'}  {rate:7.0f} images/s "
                      f"(median; fastest call {best:.0f}/s)")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
