"""Benchmark: text-spot stage throughput, TextSpotter (batched, fixed canvas) vs easyocr's naive use.

    PYTHONPATH=. .venv/bin/python bench/bench_textspot.py [--limit N] [--chunk 10]

Both paths run in the same process on the labelled set (bench/textspot_set.py) with the same
weights and the same caption rule (pipeline.textspot.caption_match); they alternate chunk by chunk
so load from other processes on a shared machine hits both alike. Naive = reader.readtext(image)
per image with easyocr's defaults. Reports images/s, speed-up, and precision / recall of the drop
verdict for both; on a CUDA machine also the GPU images/s of TextSpotter.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0, help="use N images spread evenly over the set (0 = all)")
    parser.add_argument("--chunk", type=int, default=10, help="images per alternation between the two paths")
    args = parser.parse_args()
    items = build_set()
    if args.limit:  # every k-th item, so each kind (caption text, clean, other text, natural) stays in
        items = items[::max(1, len(items) // args.limit)][:args.limit]
    images, captions, truth = [i.image for i in items], [i.caption for i in items], [i.drop for i in items]
    params = TextSpotParams()
    fast = TextSpotter(gpu=False, params=params)
    reader = get_reader(False)
    spot_and_match(images[:2], captions[:2], spotter=fast)   # warm-up: first calls allocate
    reader.readtext(images[0])

    fast_s = naive_s = 0.0
    fast_drop: list[bool] = []
    naive: list[bool] = []
    for start in range(0, len(items), args.chunk):
        sl = slice(start, start + args.chunk)
        t0 = time.perf_counter()
        fast_drop += [r.drop for r in spot_and_match(images[sl], captions[sl], spotter=fast)]
        t1 = time.perf_counter()
        naive += [naive_drop(reader, im, cap, params) for im, cap in zip(images[sl], captions[sl])]
        t2 = time.perf_counter()
        fast_s, naive_s = fast_s + t1 - t0, naive_s + t2 - t1
        print(f"{min(len(items), start + args.chunk)}/{len(items)}: fast {fast_s:.1f}s naive {naive_s:.1f}s", flush=True)

    n = len(items)
    result = {
        "machine": machine(),
        "set": {"n_images": n, "n_drop": sum(truth), "generator": "bench/textspot_set.py build_set(seed=0)"},
        "params": {k: getattr(params, k) for k in params.__dataclass_fields__},
        "cpu": {
            "textspotter": {"images_per_s": n / fast_s, "seconds": fast_s, **verdict_quality(fast_drop, truth)},
            "naive_readtext": {"images_per_s": n / naive_s, "seconds": naive_s, **verdict_quality(naive, truth)},
            "speedup": naive_s / fast_s,
        },
        "misses": {"textspotter": [i.name for i, p in zip(items, fast_drop) if p != i.drop],
                   "naive_readtext": [i.name for i, p in zip(items, naive) if p != i.drop]},
    }
    if torch.cuda.is_available():
        gpu = TextSpotter(gpu=True, params=params)
        spot_and_match(images[:4], captions[:4], spotter=gpu)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gpu_drop = [r.drop for r in spot_and_match(images, captions, spotter=gpu)]
        torch.cuda.synchronize()
        gpu_s = time.perf_counter() - t0
        result["gpu"] = {"textspotter": {"images_per_s": n / gpu_s, "seconds": gpu_s, **verdict_quality(gpu_drop, truth)}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    cpu = result["cpu"]
    print(f"TextSpotter {cpu['textspotter']['images_per_s']:.2f} img/s (P {cpu['textspotter']['precision']:.3f} "
          f"R {cpu['textspotter']['recall']:.3f}) | naive {cpu['naive_readtext']['images_per_s']:.2f} img/s "
          f"(P {cpu['naive_readtext']['precision']:.3f} R {cpu['naive_readtext']['recall']:.3f}) | "
          f"speed-up {cpu['speedup']:.1f}x -> {RESULTS}")


if __name__ == "__main__":
    main()
