"""Benchmark: text spotting at the operating point, TextSpotter vs the best plain-easyocr use.

    PYTHONPATH=. .venv/bin/python bench/bench_textspot.py [--sizes 256,384,512] [--threads 1,2]   # ~15 min, 2 cores
    PYTHONPATH=. .venv/bin/python bench/bench_textspot.py --profile     # where TextSpotter's CPU time goes

Operating point: the download stage stores images as img2dataset does by default (256 px, border,
JPEG q95; 384 and 512 are options), so the set is real Flickr8k photos resized that way, with caption
words rendered on some (bench/textspot_set.py build_flickr_set: 80 pairs, 30 to drop). Every path
reads the same images in the same process with the same weights and the same caption rule
(pipeline.filter.textspot.caption_match, min_conf 0.8, min_chars 5); the paths alternate chunk by chunk so
load from other processes hits all alike. Speed is CPU seconds per image (time.process_time, all
threads of the process: robust to other jobs on a shared machine), with torch.set_num_threads(T).

References, easyocr 1.7 with the settings a user finds for small images (Reader(['en'], gpu=False),
its int8 recogniser; CRAFT at native size: readtext's mag_ratio 1 and canvas_size 2560 never resize a
<= 512 px image, which is what its docs advise for small text):
  readtext           reader.readtext(image)                       defaults, one image per call
  readtext_bs16      reader.readtext(image, batch_size=16)        recognition batched
  readtext_batched   reader.readtext_batched(images, n_width=S, n_height=S, batch_size=16), 16 images per call
The best reference per size is the one with the least CPU time per image; speed-ups are against it,
with precision/recall of the drop verdict beside every figure. TextSpotter paths:
  textspotter            spot_and_match(images, captions) with TextSpotParams() (what the API gives)
  textspotter_fp32       the same with cpu_bf16=False (what is left without bf16 units)
  textspotter_recording  spot(images) with the image stage's recording settings (pipeline.filter.image_stage:
                         boxes for >= 3 characters read, every weak box re-read, no caption shortcut),
                         then the rule: what the filter job runs since detections are stored
The old labelled set (bench/textspot_set.py build_set: 60 web-size images, 400-1024 px) is measured for
quality too. On a CUDA machine also GPU images/s against readtext on the same GPU.
Writes bench/results/textspot.json with the machine description.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

import torch  # noqa: E402

from bench.textspot_set import build_flickr_set, build_set  # noqa: E402
from pipeline.filter.textspot import TextSpotParams, TextSpotter, caption_match, get_reader, spot_and_match  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "textspot.json"
PROFILE = RESULTS.parent / "textspot_profile.txt"
CHUNK = 16  # images per call and per alternation between paths (a Spark partition passes more at once)


def verdict_quality(predicted: list[bool], truth: list[bool]) -> dict:
    tp = sum(p and t for p, t in zip(predicted, truth))
    fp = sum(p and not t for p, t in zip(predicted, truth))
    fn = sum(t and not p for p, t in zip(predicted, truth))
    return {"precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
            "recall": round(tp / (tp + fn), 4) if tp + fn else 1.0, "tp": tp, "fp": fp, "fn": fn}


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}
    try:
        info["load_avg_1m_at_start"] = os.getloadavg()[0]  # other processes share the cores here
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _triples(found) -> list[tuple[str, float]]:
    return [(text, float(conf)) for _box, text, conf in found]


def reference_paths(reader, size: int) -> dict:
    """name -> fn(images) -> per image [(text, conf)]: plain easyocr as a user writes it."""
    return {
        "readtext": lambda images: [_triples(reader.readtext(im)) for im in images],
        "readtext_bs16": lambda images: [_triples(reader.readtext(im, batch_size=16)) for im in images],
        "readtext_batched": lambda images: [_triples(r) for r in reader.readtext_batched(
            list(images), n_width=size, n_height=size, batch_size=16)],
    }


def spotter_paths(gpu: bool = False) -> dict:
    """name -> fn(images, captions) -> per image [(text, conf)]."""
    fast = TextSpotter(gpu=gpu)
    paths = {"textspotter": lambda ims, caps: [r.detections for r in spot_and_match(ims, caps, spotter=fast)]}
    if gpu:
        return paths
    fp32 = TextSpotter(gpu=False, cpu_bf16=False)
    paths["textspotter_fp32"] = lambda ims, caps: [r.detections for r in spot_and_match(ims, caps, spotter=fp32)]
    try:  # the filter job's own settings, where this version of the image stage has them
        from pipeline.filter.image_stage import ImageStageParams
        recording = TextSpotter(gpu=False, params=ImageStageParams().spotting())
        paths["textspotter_recording"] = lambda ims, caps: recording.spot(ims)
    except (ImportError, AttributeError):
        pass
    return paths


def measure(items, paths: dict, subset_every: dict) -> dict:
    """Each path over the items (or every k-th for the paths in subset_every), chunks interleaved."""
    images, captions = [i.image for i in items], [i.caption for i in items]
    for name, fn in paths.items():  # warm-up: first calls per shape build kernels (Spark keeps its spotter)
        fn(images[:2], captions[:2]) if name.startswith("textspotter") else fn(images[:2])
    cpu = dict.fromkeys(paths, 0.0)
    wall = dict.fromkeys(paths, 0.0)
    drops: dict = {name: {} for name in paths}
    for start in range(0, len(items), CHUNK):
        for name, fn in paths.items():
            idx = [k for k in range(start, min(len(items), start + CHUNK)) if k % subset_every.get(name, 1) == 0]
            if not idx:
                continue
            ims, caps = [images[k] for k in idx], [captions[k] for k in idx]
            t0, c0 = time.perf_counter(), time.process_time()
            found = fn(ims, caps) if name.startswith("textspotter") else fn(ims)
            cpu[name] += time.process_time() - c0
            wall[name] += time.perf_counter() - t0
            for k, dets in zip(idx, found):
                drops[name][k] = caption_match(dets, captions[k]) is not None
    out = {}
    for name in paths:
        idx = sorted(drops[name])
        out[name] = {"n_images": len(idx), "cpu_s_per_image": round(cpu[name] / len(idx), 4),
                     "wall_s_per_image": round(wall[name] / len(idx), 4),
                     **verdict_quality([drops[name][k] for k in idx], [items[k].drop for k in idx]),
                     "misses": [items[k].name for k in idx if drops[name][k] != items[k].drop]}
    refs = {n: r for n, r in out.items() if not n.startswith("textspotter")}
    if refs:
        best = min(refs, key=lambda n: refs[n]["cpu_s_per_image"])
        out["best_reference"] = best
        for name in paths:
            if name.startswith("textspotter"):
                out[name]["speedup_cpu_vs_best_reference"] = round(
                    refs[best]["cpu_s_per_image"] / out[name]["cpu_s_per_image"], 2)
    return out


def profile(size: int = 256):
    """torch profiler table of TextSpotter at the operating point (1 thread) -> bench/results/textspot_profile.txt."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function
    torch.set_num_threads(1)
    items = build_flickr_set(size)
    images, captions = [i.image for i in items], [i.caption for i in items]
    spotter = TextSpotter(gpu=False)
    spot_and_match(images[:CHUNK], captions[:CHUNK], spotter=spotter)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for start in range(0, len(items), CHUNK):
            with record_function("detect (CRAFT + boxes)"):
                spotter.detect(images[start:start + CHUNK])
            with record_function("spot_and_match (all)"):
                spot_and_match(images[start:start + CHUNK], captions[start:start + CHUNK], spotter=spotter)
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    PROFILE.write_text(f"TextSpotter, {len(items)} Flickr8k images at {size} px, 1 thread, bf16={spotter.bf16}\n"
                       f"(detect is timed alone and again inside spot_and_match)\n{table}\n")
    print(table)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,384,512", help="download-stage image sizes (the first is the operating point)")
    ap.add_argument("--threads", default="1,2", help="torch thread counts measured at the first size")
    ap.add_argument("--option-subset", type=int, default=2,
                    help="at the other sizes the references read every k-th image (they cost ~1-3 s each)")
    ap.add_argument("--profile", action="store_true", help="only write the profile of TextSpotter")
    args = ap.parse_args()
    if args.profile:
        return profile(int(args.sizes.split(",")[0]))
    sizes, threads = [int(s) for s in args.sizes.split(",")], [int(t) for t in args.threads.split(",")]
    result = {"machine": machine(), "params": dataclasses.asdict(TextSpotParams()),
              "set": "bench/textspot_set.py build_flickr_set(size, seed=0): 80 Flickr8k dev photos (30 caption_text "
                     "-> drop, 35 clean, 15 other_text), img2dataset border resize + JPEG q95",
              "reference_settings": "easyocr.Reader(['en'], gpu=False) (int8 recogniser); readtext defaults "
                                    "(mag_ratio 1, canvas_size 2560: CRAFT at native size); see the module docstring",
              "cpu": {}}
    reader = get_reader(False)
    spotters = spotter_paths()
    result["cpu_bf16"] = TextSpotter(gpu=False).bf16
    for n, size in enumerate(sizes):
        items = build_flickr_set(size)
        for t in threads if n == 0 else threads[:1]:
            torch.set_num_threads(t)
            paths = {**reference_paths(reader, size), **spotters}
            if n:  # options: the two references that matter, on a subset
                paths.pop("readtext_bs16")
            subset = {} if n == 0 else {name: args.option_subset for name in paths if not name.startswith("textspotter")}
            key = f"{size}px_{t}thread"
            result["cpu"][key] = r = measure(items, paths, subset)
            print(key, json.dumps({k: (v if isinstance(v, str) else {m: v[m] for m in ("cpu_s_per_image", "recall",
                                   "precision") if m in v} | ({"x": v["speedup_cpu_vs_best_reference"]} if
                                   "speedup_cpu_vs_best_reference" in v else {})) for k, v in r.items()}), flush=True)
    torch.set_num_threads(1)
    old = build_set()
    fast = TextSpotter(gpu=False)
    res = spot_and_match([i.image for i in old], [i.caption for i in old], spotter=fast)
    result["web_size_set_textspotter"] = {"n_images": len(old), **verdict_quality([r.drop for r in res], [i.drop for i in old]),
                                          "misses": [i.name for r, i in zip(res, old) if r.drop != i.drop]}
    if torch.cuda.is_available():
        result["gpu"] = gpu_figures(build_flickr_set(sizes[0]), sizes[0])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {RESULTS}")


def gpu_figures(items, size: int) -> dict:
    """Images/s on the GPU: TextSpotter (batched) vs readtext / readtext_batched on the same GPU."""
    gpu_reader = get_reader(True)
    paths = {**{k: v for k, v in reference_paths(gpu_reader, size).items() if k != "readtext_bs16"},
             **spotter_paths(gpu=True)}
    out = {"device": torch.cuda.get_device_name(0)}
    images, captions = [i.image for i in items] * 4, [i.caption for i in items] * 4   # enough to fill batches
    for name, fn in paths.items():
        call = (lambda: fn(images, captions)) if name.startswith("textspotter") else (lambda: fn(images))
        fn(images[:CHUNK], captions[:CHUNK]) if name.startswith("textspotter") else fn(images[:CHUNK])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        found = call()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out[name] = {"images_per_s": round(len(images) / seconds, 1), **verdict_quality(
            [caption_match(d, c) is not None for d, c in zip(found, captions)], [i.drop for i in items] * 4)}
    best = max((n for n in out if n.startswith("readtext")), key=lambda n: out[n]["images_per_s"])
    out["speedup_vs_best_reference"] = round(out["textspotter"]["images_per_s"] / out[best]["images_per_s"], 2)
    return out


if __name__ == "__main__":
    main()
