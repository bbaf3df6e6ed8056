"""Benchmark: text-spot stage throughput, TextSpotter (batched, fixed canvas) vs easyocr's naive use.

    PYTHONPATH=. .venv/bin/python bench/bench_textspot.py [--naive-limit 20] [--chunk 5]   # ~4-6 min on 2 cores

Both paths run in the same process with the same weights and the same caption rule
(pipeline.textspot.caption_match). Naive = reader.readtext(image) per image with easyocr's defaults
(~2-3 s per image on a core, so it runs on a subset: every k-th pair of the labelled set, all kinds
represented); on that subset the two paths alternate chunk by chunk so load from other processes on
a shared machine hits both alike, and the speed-up is measured there, in wall time and in CPU time
(time.process_time: less sensitive to other processes than wall time), with --threads torch threads
(default 1) for both. TextSpotter then runs on the whole labelled set (bench/textspot_set.py,
60 pairs) for precision / recall of the drop verdict. On a CUDA machine also the GPU images/s.
Writes bench/results/textspot.json with the machine description.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

import torch  # noqa: E402

from bench.textspot_set import build_set  # noqa: E402
from pipeline.textspot import TextSpotParams, TextSpotter, caption_match, get_reader, spot_and_match  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "textspot.json"


def verdict_quality(predicted: list[bool], truth: list[bool]) -> dict:
    tp = sum(p and t for p, t in zip(predicted, truth))
    fp = sum(p and not t for p, t in zip(predicted, truth))
    fn = sum(t and not p for p, t in zip(predicted, truth))
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0,
            "tp": tp, "fp": fp, "fn": fn}


def naive_drop(reader, image, caption, params: TextSpotParams) -> bool:
    detections = [(text, float(conf)) for _box, text, conf in reader.readtext(image)]
    return caption_match(detections, caption, params.min_conf, params.min_chars) is not None


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    try:
        info["load_avg_1m_at_start"] = os.getloadavg()[0]  # other processes share the cores here
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timed(fn):
    """fn's result, wall seconds and CPU seconds of this process."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def path_result(n: int, wall: float, cpu: float, predicted: list[bool], truth: list[bool]) -> dict:
    return {"n_images": n, "images_per_s": n / wall, "seconds": wall, "cpu_seconds": cpu,
            "cpu_seconds_per_image": cpu / n, **verdict_quality(predicted, truth)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--naive-limit", type=int, default=20,
                        help="pairs (every k-th of the set) timed with both paths; 0 = all 60 (~15 min)")
    parser.add_argument("--chunk", type=int, default=5, help="images per alternation between the two paths")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both paths (default 1: per-core throughput; on a shared machine "
                             "several threads spin-wait for busy cores, which inflates both wall and CPU time)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    items = build_set()
    subset = items[::max(1, len(items) // args.naive_limit)][:args.naive_limit] if args.naive_limit else items
    images, captions, truth = [i.image for i in subset], [i.caption for i in subset], [i.drop for i in subset]
    params = TextSpotParams()
    machine_info = machine()
    fast = TextSpotter(gpu=False, params=params)
    reader = get_reader(False)
    # warm-up, both paths on the first chunk: first calls per input shape allocate and build kernels
    # (a Spark worker keeps its spotter across partitions, so steady state is what counts)
    spot_and_match(images[:args.chunk], captions[:args.chunk], spotter=fast)
    for image in images[:args.chunk]:
        reader.readtext(image)

    fast_s = naive_s = fast_cpu = naive_cpu = 0.0
    fast_drop: list[bool] = []
    naive: list[bool] = []
    for start in range(0, len(subset), args.chunk):
        sl = slice(start, start + args.chunk)
        res, wall, cpu = timed(lambda: spot_and_match(images[sl], captions[sl], spotter=fast))
        fast_drop += [r.drop for r in res]
        fast_s, fast_cpu = fast_s + wall, fast_cpu + cpu
        res, wall, cpu = timed(lambda: [naive_drop(reader, im, cap, params) for im, cap in zip(images[sl], captions[sl])])
        naive += res
        naive_s, naive_cpu = naive_s + wall, naive_cpu + cpu
        print(f"{min(len(subset), start + args.chunk)}/{len(subset)}: fast {fast_s:.1f}s (cpu {fast_cpu:.1f}) "
              f"naive {naive_s:.1f}s (cpu {naive_cpu:.1f})", flush=True)

    all_truth = [i.drop for i in items]
    res, full_s, full_cpu = timed(lambda: spot_and_match([i.image for i in items], [i.caption for i in items],
                                                         spotter=fast))
    full_drop = [r.drop for r in res]
    n = len(subset)
    result = {
        "machine": machine_info,
        "set": {"n_images": len(items), "n_drop": sum(all_truth), "generator": "bench/textspot_set.py build_set(seed=0)",
                "timed_subset": f"every {max(1, len(items) // n)}-th pair, {n} images ({sum(truth)} to drop)"},
        "params": {k: getattr(params, k) for k in params.__dataclass_fields__},
        "cpu_bf16": fast.bf16,
        "torch_threads": args.threads,
        "cpu": {
            "subset": {
                "textspotter": path_result(n, fast_s, fast_cpu, fast_drop, truth),
                "naive_readtext": path_result(n, naive_s, naive_cpu, naive, truth),
                "speedup_wall": naive_s / fast_s,
                "speedup_cpu": naive_cpu / fast_cpu,
            },
            "full_set_textspotter": path_result(len(items), full_s, full_cpu, full_drop, all_truth),
        },
        "misses": {"textspotter_full_set": [i.name for i, p in zip(items, full_drop) if p != i.drop],
                   "naive_readtext_subset": [i.name for i, p in zip(subset, naive) if p != i.drop]},
    }
    if torch.cuda.is_available():
        gpu = TextSpotter(gpu=True, params=params)
        all_images, all_captions = [i.image for i in items], [i.caption for i in items]
        spot_and_match(all_images[:4], all_captions[:4], spotter=gpu)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gpu_drop = [r.drop for r in spot_and_match(all_images, all_captions, spotter=gpu)]
        torch.cuda.synchronize()
        gpu_s = time.perf_counter() - t0
        result["gpu"] = {"device": torch.cuda.get_device_name(0), "textspotter": {
            "images_per_s": len(items) / gpu_s, "seconds": gpu_s, **verdict_quality(gpu_drop, all_truth)}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    sub, full = result["cpu"]["subset"], result["cpu"]["full_set_textspotter"]
    print(f"subset of {n}: TextSpotter {sub['textspotter']['images_per_s']:.2f} img/s "
          f"(R {sub['textspotter']['recall']:.3f}) | naive {sub['naive_readtext']['images_per_s']:.2f} img/s "
          f"(R {sub['naive_readtext']['recall']:.3f}) | speed-up {sub['speedup_wall']:.1f}x wall, "
          f"{sub['speedup_cpu']:.1f}x CPU\nfull set of {len(items)}: TextSpotter P {full['precision']:.3f} "
          f"R {full['recall']:.3f}, {full['images_per_s']:.2f} img/s -> {RESULTS}")


if __name__ == "__main__":
    main()
