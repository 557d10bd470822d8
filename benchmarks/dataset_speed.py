"""
How fast does the built-in scene dataset render on this machine?

    python benchmarks/dataset_speed.py              # 64 px and 128 px, shadows on and off
    python benchmarks/dataset_speed.py --json       # ... and one JSON object on the last line
    python benchmarks/dataset_speed.py --compile    # also try torch.compile on the renderer

Each number is the median of several timed calls of render_scenes() on fresh indices (so nothing is
cached) after one warm-up call. Run it on an otherwise idle machine: with 2 cores, another busy
process makes torch's worker threads wait on each other and the numbers collapse.
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


def images_per_s(render, size, batch, repeats, config):
    render(range(batch), size, size, config=config)                     # warm-up (and compilation)
    times = []
    for r in range(1, repeats + 1):
        start = time.perf_counter()
        render(range(r * batch, (r + 1) * batch), size, size, config=config)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(render_scenes)")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, os.cpu_count() = {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    renderers = {"eager": data.render_scenes}
    if args.compile:
        renderers["compiled"] = torch.compile(data.render_scenes, dynamic=True)
    results = {}
    for name, render in renderers.items():
        for size in (64, 128):
            for shadows in (True, False):
                config = data.SceneConfig(shadows=shadows)
                rate = images_per_s(render, size, args.batch, args.repeats, config)
                key = f"images_per_s_{size}" + ("" if shadows else "_no_shadows") + ("" if name == "eager" else "_compiled")
                results[key] = round(rate, 1)
                print(f"{name:8s} {size:3d} px  shadows {'on ' if shadows else 'off'}  {rate:8.0f} images/s")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
