"""Benchmark: text spotting at the operating point - engines x image sizes x detection settings.

    PYTHONPATH=. .venv/bin/python bench/bench_textspot.py              # ~25 CPU min; writes bench/results/textspot.json + .md
    PYTHONPATH=. .venv/bin/python bench/bench_textspot.py --quick      # 256 px only, no baselines at other sizes

Sets (bench/textspot_set.py):
  real      the labelled real-text set (bench/data/realtext_labels.csv: real Flickr8k / COCO photos looked at
            one by one; drop = the caption quotes legible natural text), stored as the download stage
            stores it at 256, 384 and 512 px (img2dataset's border resize + JPEG q95) and at native size
  rendered  build_flickr_set(256): Flickr8k dev photos with caption words rendered as overlay titles (80)
  hard      build_hard_rendered_set(256): small (4-8% of the height), perspective, low-contrast, busy and
            multi-line rendered caption words (40) + 20 clean photos
Paths, every one through the same DiHT rule (pipeline.filter.textspot.caption_match, conf >= 0.8,
>= 5 characters; a path's lines are lines, its words words):
  easyocr_readtext   easyocr.Reader(['en']).readtext(image) with its defaults (the competent baseline:
                     CRAFT at native size for images <= 2560 px, lines merged by readtext)
  rapidocr_default   rapidocr_onnxruntime.RapidOCR()(bgr) with its defaults (short side upscaled to 736)
  easyocr            TextSpotter (this project, engine easyocr) with its defaults
  ppocr              PPOCRSpotter (this project, engine ppocr) with its defaults
  <engine>_recording the image stage's spotter (ImageStageParams().spotting(): what `make filter` runs)
and the policy sweep: each engine with canvas_min in POLICY_MINS (and the old 160-px canvas) on real@256 and rendered@256 (the recall/CPU
curve the detection-scale defaults were chosen from). For each engine path also "line_rule": the same
detections without block matching (caption_match(blocks=False): runs of one line only), and
"word_rule": through the word-level rule (every detection a line of its own), i.e. without line or
block matching (the baselines give (text, conf) pairs without boxes: no lines, no blocks). Speed: CPU seconds per image (time.process_time, whole process), one thread for torch and
ONNX Runtime, models loaded and warmed up before timing. On a CUDA machine: GPU images/s per engine.
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

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.textspot_set import build_flickr_set, build_hard_rendered_set, build_realtext_set  # noqa: E402
from pipeline.filter.image_stage import ImageStageParams  # noqa: E402
from pipeline.filter.spotting import make_spotter  # noqa: E402
from pipeline.filter.textspot import ENGINE_CANVAS, TextSpotParams, caption_match, get_reader  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "textspot.json"
TABLE = RESULTS.with_suffix(".md")
CHUNK = 16
POLICY_MINS = (256, 320, 384, 448, 512, 640)
POLICY_MINS_EASYOCR = (256, 384, 512)


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "note": "shared machine: other jobs ran on the same cores; CPU seconds (process_time) are robust to that"}
    try:
        info["load_avg_1m_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def quality(drops: list[bool], items) -> dict:
    tp = sum(d and i.drop for d, i in zip(drops, items))
    fp = sum(d and not i.drop for d, i in zip(drops, items))
    fn = sum(i.drop and not d for d, i in zip(drops, items))
    return {"precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
            "recall": round(tp / (tp + fn), 4) if tp + fn else 1.0, "tp": tp, "fp": fp, "fn": fn,
            "misses": [i.name for d, i in zip(drops, items) if d != i.drop]}


# ---------------------------------------------------------------- paths: images -> per image detections
def readtext_path():
    reader = get_reader(False)
    return lambda ims: [[(t, float(c)) for _b, t, c in reader.readtext(im)] for im in ims]


def rapidocr_path():
    from rapidocr_onnxruntime import RapidOCR
    engine = RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1)

    def run(ims):
        out = []
        for im in ims:
            res, _ = engine(np.ascontiguousarray(im[:, :, ::-1]))
            out.append([(t, float(s)) for _b, t, s in (res or [])])
        return out
    return run


def spotter_path(params: TextSpotParams, gpu=False):
    spotter = make_spotter(params, gpu=gpu)
    return lambda ims: [d for chunk in range(0, len(ims), CHUNK) for d in spotter.spot(ims[chunk:chunk + CHUNK])]


def run_path(fn, items) -> dict:
    images = [i.image for i in items]
    fn(images[:2])  # warm-up (first-call allocations, lazy init)
    clock, wall = time.process_time(), time.perf_counter()
    found = fn(images)
    cpu, wall = time.process_time() - clock, time.perf_counter() - wall
    out = {"n_images": len(items), "cpu_s_per_image": round(cpu / len(items), 4),
           "wall_s_per_image": round(wall / len(items), 4)}
    out.update(quality([caption_match(d, i.caption) is not None for d, i in zip(found, items)], items))
    if any(len(d) > 2 and d[2] is not None for dets in found for d in dets):
        # the same detections without block matching (runs of one line only): what blocks add
        lq = quality([caption_match(d, i.caption, blocks=False) is not None for d, i in zip(found, items)], items)
        out["line_rule"] = {k: lq[k] for k in ("precision", "recall", "tp", "fp", "fn")}
    if any(len(d) > 2 for dets in found for d in dets):
        # the same detections, each a line of its own: the word-level rule (no line matching)
        words = [[(d[0], d[1]) for d in dets] for dets in found]
        wq = quality([caption_match(d, i.caption) is not None for d, i in zip(words, items)], items)
        out["word_rule"] = {k: wq[k] for k in ("precision", "recall", "tp", "fp", "fn")}
    return out


def engine_params(engine: str, **kw) -> TextSpotParams:
    return TextSpotParams(engine=engine, **kw)


def recording_params(engine: str) -> TextSpotParams:
    """What the image stage runs on CPU: ImageStageParams(engine).spotting()."""
    return ImageStageParams(textspot=TextSpotParams(engine=engine)).spotting()


def gpu_figures(items) -> dict:
    out = {}
    for engine in ("easyocr", "ppocr"):
        fn = spotter_path(TextSpotParams(engine=engine), gpu=True)
        images = [i.image for i in items]
        fn(images[:CHUNK])
        torch.cuda.synchronize()
        t = time.perf_counter()
        found = fn(images)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        out[engine] = {"images_per_s": round(len(images) / wall, 1),
                       **quality([caption_match(d, i.caption) is not None for d, i in zip(found, items)], items)}
    return out


SET_NAMES = ("real_256", "real_384", "real_512", "real_native", "rendered_256", "hard_256")
MAIN_PATHS = ("easyocr_readtext", "rapidocr_default", "easyocr", "ppocr")


def build_sets(names, subset: int | None) -> dict:
    """The named sets; real sets at other sizes than 256 are cut to a stratified `subset` when given."""
    sets = {}
    for name in names:
        if name.startswith("real_"):
            size = name.split("_")[1]
            sets[name] = build_realtext_set(None if size == "native" else int(size),
                                            limit=None if size == "256" else subset)
        elif name == "rendered_256":
            sets[name] = build_flickr_set(256)
        elif name == "hard_256":
            sets[name] = build_hard_rendered_set(256)
    return sets


def measure_main(result: dict, sets: dict, path_names) -> None:
    makers = {"easyocr_readtext": readtext_path, "rapidocr_default": rapidocr_path,
              "easyocr": lambda: spotter_path(engine_params("easyocr")),
              "ppocr": lambda: spotter_path(engine_params("ppocr")),
              "easyocr_recording": lambda: spotter_path(recording_params("easyocr")),
              "ppocr_recording": lambda: spotter_path(recording_params("ppocr"))}
    paths = {name: makers[name]() for name in path_names}
    for name, items in sets.items():
        result["sets"][name] = {"n": len(items), "n_drop": sum(i.drop for i in items)}
        for path, fn in paths.items():
            if name != "real_256" and path.endswith("_recording"):
                continue
            r = result["cpu"].setdefault(name, {})[path] = run_path(fn, items)
            print(f"{name:14s} {path:18s} P {r['precision']:.3f} R {r['recall']:.3f} {r['cpu_s_per_image']:.3f} CPU s/img",
                  json.dumps({"set": name, "path": path, "result": r}), flush=True)


def measure_policy(result: dict, engines, set_names, mins_override=None) -> None:
    sets = build_sets(set_names, None)
    for engine in engines:
        mins = POLICY_MINS if engine == "ppocr" else POLICY_MINS_EASYOCR   # easyocr: ~0.3-1 CPU s/image
        points = mins_override or (None, *mins)
        for lo in points:   # None: the old easyocr policy (x0.625, never upscaled: 160 px at 256)
            key = f"{engine}_min{lo or 'legacy160'}"
            kw = {"canvas_min": lo} if lo else {"canvas_min": 160, "canvas_size": 160}
            fn = spotter_path(engine_params(engine, **kw))
            row = result["policy"][key] = {"engine": engine, "canvas_min": kw["canvas_min"],
                                           "canvas_max": kw.get("canvas_size", ENGINE_CANVAS[engine][1])}
            for name, items in sets.items():
                r = run_path(fn, items)
                row[name] = {k: r[k] for k in ("precision", "recall", "cpu_s_per_image")}
                row[name]["recall_word_rule"] = r.get("word_rule", {}).get("recall")
                row[name]["recall_line_rule"] = r.get("line_rule", {}).get("recall")
            print(key, row, flush=True)


def merge(files: list[str]) -> dict:
    """Partial results (several processes, --sets / --policy-only) as one result."""
    out = None
    for f in files:
        part = json.loads(Path(f).read_text())
        if out is None:
            out = part
            continue
        for key in ("sets", "cpu", "policy"):
            for name, value in part.get(key, {}).items():
                if isinstance(value, dict) and isinstance(out[key].get(name), dict):
                    out[key][name].update(value)
                else:
                    out[key][name] = value
        if part.get("gpu"):
            out["gpu"] = part["gpu"]
        for key in ("machine", "engine_canvas_defaults", "default_engine", "params"):   # the latest run's
            if key in part:
                out[key] = part[key]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SET_NAMES), help="comma-separated: " + ", ".join(SET_NAMES))
    parser.add_argument("--paths", default=",".join(MAIN_PATHS + ("easyocr_recording", "ppocr_recording")))
    parser.add_argument("--subset", type=int, default=None,
                        help="real-text sets at sizes other than 256: a stratified subset of this many images")
    parser.add_argument("--policy", default="easyocr,ppocr", help="engines to sweep the detection scale for ('' = none)")
    parser.add_argument("--policy-sets", default="real_256,rendered_256")
    parser.add_argument("--policy-mins", default="", help="comma-separated canvas_min points instead of the defaults")
    parser.add_argument("--merge", nargs="+", help="combine partial result files into --out instead of measuring")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    out = Path(args.out)
    if args.merge:
        result = merge(args.merge)
    else:
        torch.set_num_threads(1)
        os.environ["CATCURATE_TASK_THREADS"] = "1"
        result = {"machine": machine(), "rule": {"min_conf": 0.8, "min_chars": 5},
                  "engine_canvas_defaults": {k: list(v) for k, v in ENGINE_CANVAS.items()},
                  "default_engine": TextSpotParams().engine,
                  "params": {e: dataclasses.asdict(TextSpotParams(engine=e)) for e in ("easyocr", "ppocr")},
                  "subset_other_sizes": args.subset, "sets": {}, "cpu": {}, "policy": {}}
        names = [s for s in args.sets.split(",") if s]
        if names:
            measure_main(result, build_sets(names, args.subset), [p for p in args.paths.split(",") if p])
        if args.policy:
            measure_policy(result, args.policy.split(","), args.policy_sets.split(","),
                           [int(v) for v in args.policy_mins.split(",") if v] or None)
        if torch.cuda.is_available():
            engines = gpu_figures(build_realtext_set(256))
            result["gpu"] = {"textspotter": engines[result["default_engine"]], "engines": engines}
    # the cost model's input (bench/cost_model.py): the stage's recording settings, default engine, 256 px
    recording = result["cpu"].get("real_256", {}).get(f"{result['default_engine']}_recording")
    if recording:
        result["cpu"]["256px_1thread"] = {"textspotter_recording": recording, "engine": result["default_engine"]}
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"-> {out}")


def markdown(result: dict) -> str:
    lines = [f"# Text spotting benchmark ({result['machine']['date']}, {result['machine']['cpu']}, "
             f"{result['machine']['cpu_count']} cores shared, 1 thread)", "",
             "DiHT rule: conf >= 0.8, >= 5 shared characters. P / R of the drop verdict, CPU s per image. "
             "Missing rows were not measured (see the JSON's notes).", "",
             "| set | path | precision | recall | CPU s/image | recall, lines only | recall, word rule |",
             "|---|---|---|---|---|---|---|"]
    for name, paths in result["cpu"].items():
        if name == "256px_1thread":
            continue
        for path, r in paths.items():
            word = r.get("word_rule", {}).get("recall", "")
            line = r.get("line_rule", {}).get("recall", "")
            s = result.get("sets", {}).get(name, {})
            label = f"{name} ({s['n']}, {s['n_drop']} to drop)" if s else name
            lines.append(f"| {label} | {path} | {r['precision']:.3f} | {r['recall']:.3f} | {r['cpu_s_per_image']:.3f} | "
                         f"{line} | {word} |")
    if result.get("policy"):
        lines += ["", "Detection-scale policy (canvas long side = image long side clamped to [canvas_min, canvas_max]):", "",
                  "| engine | canvas min..max | real@256 P | real@256 R | real@256 CPU s | rendered@256 R | rendered CPU s |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(result["policy"].values(), key=lambda r: (r["engine"] != result["default_engine"], r["engine"],
                                                                  r["canvas_min"], r["canvas_max"])):
            a, b = r["real_256"], r.get("rendered_256")
            rendered = f"{b['recall']:.3f} | {b['cpu_s_per_image']:.3f}" if b else "- | -"
            lines.append(f"| {r['engine']} | {r['canvas_min']}..{r['canvas_max']} | {a['precision']:.3f} | {a['recall']:.3f} | "
                         f"{a['cpu_s_per_image']:.3f} | {rendered} |")
    if result.get("gpu"):
        lines += ["", "GPU images/s: " + ", ".join(f"{k} {v['images_per_s']}" for k, v in result["gpu"]["engines"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
