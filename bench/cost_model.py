"""Cost model: what the CAT filter and distillation cost per million input rows, projected to LAION scale.

    PYTHONPATH=. .venv/bin/python bench/cost_model.py      # ~10 s; `make bench` runs it after the benchmarks

Reads the figures the benchmarks measured (bench/results/captions.json, filter.json, textspot.json,
distill.json) and measures one thing itself, cheaply: the size of an image as img2dataset stores it
with its defaults (256 px, resize_mode border, JPEG quality 95), by running img2dataset's own Resizer on
real photos (../shared/data/coco-mini: 80 COCO photos at Flickr's 640 px, the figure used;
../shared/data/flickr8k: photos stored at 224x224, which img2dataset upscales, for comparison). Nothing else is assumed that is not
written into the output: every figure carries the file and key it came from, every assumption is
listed, and a figure no benchmark measured (GPU throughput so far) is "not measured", not estimated.

Stages, per 1,000,000 input rows (LAION metadata: URL + caption):
  caption   the caption stage's parser CPU-seconds (real LAION captions) and the whole Spark job's
            core-seconds (keys, parse, dedupe, finalize; local[2])
  download  rows the caption stage drops are never downloaded: the bytes not fetched (originals) and
            not stored (256-px JPEGs)
  textspot  CPU-seconds to spot text in the caption survivors' images (GPU: where measured)
  teacher   CPU-seconds for the distillation teacher on those images (GPU: where measured)
Projections multiply by the dataset's rows / 1e6 (everything is linear in rows) and report core-hours
and GPU-hours. Writes bench/results/cost.json and bench/results/cost.md (the README's table).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared" / "data"
# row counts of the datasets (DESIGN.md: LAION-2B is 2.1 billion pairs); the model is linear in rows
DATASETS = {"LAION-400M": 400_000_000, "LAION-2B": 2_100_000_000}
MILLION = 1_000_000
NOT_MEASURED = "not measured"


class Figures:
    """The measured figures the model uses, each with where it came from (written into cost.json)."""

    def __init__(self):
        self.used: dict[str, dict] = {}

    def take(self, name: str, file: str, *keys: str, optional: bool = False):
        """bench/results/<file>.json at keys. A figure the benchmark did not measure (no such key) is an
        error, or None when `optional` (GPU figures: measured only where CUDA was present)."""
        value = json.loads((RESULTS / f"{file}.json").read_text())
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        where = f"bench/results/{file}.json: {'.'.join(keys)}"
        if value is None and not optional:
            raise KeyError(f"{where} is missing: run bench/bench_{file}.py first")
        return self.record(name, value, where)

    def record(self, name: str, value, source: str):
        self.used[name] = {"value": value, "source": source}
        return value


def img2dataset_jpeg_bytes(photos: list[bytes]) -> list[int]:
    """Byte sizes of the photos as img2dataset's downloader stores them with its default arguments."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")   # else albumentations calls out at import
    import inspect

    from img2dataset import download
    from img2dataset.resizer import Resizer
    defaults = {k: v.default for k, v in inspect.signature(download).parameters.items()}
    resizer = Resizer(image_size=defaults["image_size"], resize_mode=defaults["resize_mode"],
                      resize_only_if_bigger=defaults["resize_only_if_bigger"],
                      upscale_interpolation=defaults["upscale_interpolation"],
                      downscale_interpolation=defaults["downscale_interpolation"],
                      encode_quality=defaults["encode_quality"], encode_format=defaults["encode_format"])
    sizes = []
    for blob in photos:
        encoded, *_dims, err = resizer(io.BytesIO(blob))
        if err is None:
            sizes.append(len(encoded))
    return sizes


def measure_jpeg_sizes(flickr_photos: int) -> dict:
    """Mean bytes per image: originals as fetched and as img2dataset stores them, on real photos."""
    import pyarrow.parquet as pq
    coco = [p.read_bytes() for p in sorted((SHARED / "coco-mini" / "images").glob("*.jpg"))]
    flickr = pq.read_table(SHARED / "flickr8k" / "images.parquet", columns=["jpg"]).column("jpg")
    flickr = [b for b in flickr.slice(0, flickr_photos).to_pylist() if b]
    out = {}
    for name, photos, note in (
            ("coco_mini", coco, "80 COCO train2017 photos as Flickr served them (typ. 640x480): img2dataset "
                                "downscales, as it does web images larger than 256 px"),
            ("flickr8k", flickr, f"the first {len(flickr)} Flickr8k photos of ../shared/data/flickr8k, stored at "
                                 "224x224: img2dataset upscales them to fill 256x256 (no black border)")):
        stored = img2dataset_jpeg_bytes(photos)
        out[name] = {"n_images": len(stored), "original_mean_bytes": round(sum(map(len, photos)) / len(photos)),
                     "img2dataset_256px_mean_bytes": round(sum(stored) / len(stored)), "note": note}
    return out


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a proportion measured on n rows (the pass rate comes from a 1,000-caption sample)."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(centre - half, 4), round(centre + half, 4)


def cost_model(jpeg: dict) -> dict:
    f = Figures()
    # caption stage
    parse_rate = f.take("caption_parser_captions_per_cpu_s", "captions", "laion_test_1000", "fast", "captions_per_cpu_s")
    pass_rate = f.take("caption_pass_rate_laion", "captions", "laion_test_1000", "keep_rate_fast")
    n_captions = f.take("caption_sample_rows", "captions", "laion_test_1000", "rows")
    job_rows = f.take("filter_job_rows", "filter", "throughput", "rows")
    job_s = f.take("filter_job_seconds", "filter", "throughput", "spark_job", "job_s")
    job_cores = f.take("filter_job_cores", "filter", "machine", "cores")
    # images
    original_bytes = f.record("original_jpeg_mean_bytes", jpeg["coco_mini"]["original_mean_bytes"],
                              "bench/results/cost.json: jpeg_sizes.coco_mini.original_mean_bytes (this script)")
    stored_bytes = f.record("img2dataset_256px_jpeg_mean_bytes", jpeg["coco_mini"]["img2dataset_256px_mean_bytes"],
                            "bench/results/cost.json: jpeg_sizes.coco_mini.img2dataset_256px_mean_bytes (this script)")
    # text spotting: the stage's own settings (ImageStageParams().spotting() on CPU) on 256-px photos
    spot_cpu_s = f.take("textspot_cpu_s_per_image", "textspot", "cpu", "256px_1thread", "textspotter_recording",
                        "cpu_s_per_image")
    spot_gpu_rate = f.take("textspot_gpu_images_per_s", "textspot", "gpu", "textspotter", "images_per_s",
                           optional=True)
    # teacher
    teacher_cpu_rate = f.take("teacher_images_per_cpu_s", "distill", "teacher_throughput", "cpu_1_thread",
                              "end_to_end", "images_per_cpu_s")
    teacher_gpu_rate = f.take("teacher_gpu_images_per_s", "distill", "teacher_throughput", "gpu", "end_to_end",
                              "images_per_wall_s", optional=True)
    teacher_spec = f.take("teacher_spec", "distill", "teacher_spec")

    survivors = pass_rate * MILLION          # rows whose images are downloaded, spotted and embedded
    dropped = MILLION - survivors
    per_million = {
        "caption_parse_cpu_s": round(MILLION / parse_rate),
        "caption_job_core_s": round(job_s * job_cores * MILLION / job_rows),
        "images_downloaded": round(survivors),
        "images_not_downloaded": round(dropped),
        "download_gb_saved": round(dropped * original_bytes / 1e9, 1),
        "download_gb_needed": round(survivors * original_bytes / 1e9, 1),
        "storage_gb_saved_256px": round(dropped * stored_bytes / 1e9, 1),
        "textspot_cpu_s": round(survivors * spot_cpu_s),
        "textspot_cpu_s_without_caption_first": round(MILLION * spot_cpu_s),
        "textspot_gpu_s": _gpu_seconds(survivors, spot_gpu_rate),
        "teacher_cpu_s": round(survivors / teacher_cpu_rate),
        "teacher_gpu_s": _gpu_seconds(survivors, teacher_gpu_rate),
    }
    projections = {}
    for dataset, rows in DATASETS.items():
        scale = rows / MILLION
        projections[dataset] = {
            "rows": rows,
            "caption_parse_core_hours": round(per_million["caption_parse_cpu_s"] * scale / 3600),
            "caption_job_core_hours": round(per_million["caption_job_core_s"] * scale / 3600),
            "images_downloaded": round(per_million["images_downloaded"] * scale),
            "download_tb_saved": round(per_million["download_gb_saved"] * scale / 1000, 1),
            "storage_tb_saved_256px": round(per_million["storage_gb_saved_256px"] * scale / 1000, 1),
            "textspot_core_hours": round(per_million["textspot_cpu_s"] * scale / 3600),
            "textspot_core_hours_without_caption_first": round(
                per_million["textspot_cpu_s_without_caption_first"] * scale / 3600),
            "textspot_gpu_hours": _scaled_hours(per_million["textspot_gpu_s"], scale),
            "teacher_core_hours": round(per_million["teacher_cpu_s"] * scale / 3600),
            "teacher_gpu_hours": _scaled_hours(per_million["teacher_gpu_s"], scale),
        }
    low, high = wilson_interval(pass_rate, n_captions)
    assumptions = [
        "Every input row has a caption and a URL whose image would download; dead links (common in LAION) are "
        "not measured here, so download, text-spot and teacher figures are upper bounds for the survivors.",
        f"Caption-stage pass rate {pass_rate} = the stage's keep rate on {n_captions} real LAION captions "
        f"(95% interval {low}-{high}); LAION-2B's non-English captions are not measured.",
        f"Bytes fetched per image = the mean original size of {jpeg['coco_mini']['n_images']} COCO photos "
        f"({original_bytes} B, Flickr's 640-px JPEGs); LAION originals vary in size and are not measured.",
        f"Bytes stored per image = img2dataset's default output (256 px, border, JPEG q95) of the same photos "
        f"({stored_bytes} B), measured with img2dataset's Resizer; Flickr8k photos (224 px, upscaled) give "
        f"{jpeg['flickr8k']['img2dataset_256px_mean_bytes']} B.",
        "Text spotting and the teacher run on every caption survivor; distinct images are counted as rows "
        "(the stage spots each distinct image once, so duplicates make it cheaper); the text-spot drop rate on "
        "LAION is not measured, so the teacher's input is not reduced by it.",
        f"Text spotting: the stage's settings on 256-px real photos (the download stage's size), one thread "
        f"({spot_cpu_s} CPU s/image). Teacher: {teacher_spec}, decode + forward, one thread ({teacher_cpu_rate} "
        f"images per CPU s) on 640x480 JPEGs, whose decoding costs more than the 256-px ones it sees in the "
        f"pipeline. A DiHT-size teacher (e.g. ViT-L) costs far more per image and is not measured.",
        f"Caption job core-seconds: the whole filter job (keys, parse, dedupe, finalize) on {job_rows:,} web-like "
        f"rows (bench_captions.make_web_like: the LAION captions with web-style prefixes and suffixes, 30% "
        f"repeats) on local[{job_cores}], job time x cores; the parser figure is unique LAION captions, one core.",
        "Core = one core of the 2-core AMD EPYC development machine (bench/results/*.json: machine); other "
        "CPUs scale these figures. Linear in rows: projections = per-million figures x rows / 1e6.",
        f"Dataset rows: {', '.join(f'{k} {v:,}' for k, v in DATASETS.items())} (DESIGN.md; LAION-2B as 2.1 billion).",
    ]
    return {"benchmark": "cost", "date": time.strftime("%Y-%m-%d"), "inputs": f.used, "jpeg_sizes": jpeg,
            "per_million_input_rows": per_million, "projections": projections, "assumptions": assumptions}


def _gpu_seconds(images: float, images_per_s: float | None):
    """GPU seconds for `images` at a measured rate (one GPU); "not measured" without one."""
    return round(images / images_per_s) if images_per_s else NOT_MEASURED


def _scaled_hours(seconds, scale: float):
    return seconds if seconds == NOT_MEASURED else round(seconds * scale / 3600)


def markdown(model: dict) -> str:
    pm, pr = model["per_million_input_rows"], model["projections"]
    a, b = pr["LAION-400M"], pr["LAION-2B"]
    src = {k: v["source"] for k, v in model["inputs"].items()}
    rows = [
        (f"caption stage, parser ({model['inputs']['caption_parser_captions_per_cpu_s']['value']} captions/CPU s)", f"{pm['caption_parse_cpu_s']:,} CPU s", f"{a['caption_parse_core_hours']:,} core-h",
         f"{b['caption_parse_core_hours']:,} core-h", src["caption_parser_captions_per_cpu_s"]),
        ("caption stage, whole Spark job", f"{pm['caption_job_core_s']:,} core s", f"{a['caption_job_core_hours']:,} core-h",
         f"{b['caption_job_core_hours']:,} core-h", f"{src['filter_job_seconds']}, x cores / rows"),
        ("images downloaded (caption survivors)", f"{pm['images_downloaded']:,}", f"{a['images_downloaded']:,}",
         f"{b['images_downloaded']:,}", src["caption_pass_rate_laion"]),
        ("download saved (originals not fetched)", f"{pm['download_gb_saved']} GB", f"{a['download_tb_saved']} TB",
         f"{b['download_tb_saved']} TB", f"{src['original_jpeg_mean_bytes']} x rows dropped"),
        ("storage saved (256-px JPEGs not stored)", f"{pm['storage_gb_saved_256px']} GB",
         f"{a['storage_tb_saved_256px']} TB", f"{b['storage_tb_saved_256px']} TB",
         f"{src['img2dataset_256px_jpeg_mean_bytes']} x rows dropped"),
        (f"text spotting, CPU ({model['inputs']['textspot_cpu_s_per_image']['value']} CPU s/image)", f"{pm['textspot_cpu_s']:,} CPU s", f"{a['textspot_core_hours']:,} core-h",
         f"{b['textspot_core_hours']:,} core-h", src["textspot_cpu_s_per_image"]),
        ("text spotting, CPU, if every row were downloaded", f"{pm['textspot_cpu_s_without_caption_first']:,} CPU s",
         f"{a['textspot_core_hours_without_caption_first']:,} core-h",
         f"{b['textspot_core_hours_without_caption_first']:,} core-h", src["textspot_cpu_s_per_image"]),
        ("text spotting, GPU", _fmt(pm["textspot_gpu_s"], "GPU s"), _fmt(a["textspot_gpu_hours"], "GPU-h"),
         _fmt(b["textspot_gpu_hours"], "GPU-h"), _source(model, "textspot_gpu_images_per_s")),
        (f"teacher ({model['inputs']['teacher_spec']['value']}), CPU "
         f"({model['inputs']['teacher_images_per_cpu_s']['value']} images/CPU s)", f"{pm['teacher_cpu_s']:,} CPU s", f"{a['teacher_core_hours']:,} core-h",
         f"{b['teacher_core_hours']:,} core-h", src["teacher_images_per_cpu_s"]),
        ("teacher, GPU", _fmt(pm["teacher_gpu_s"], "GPU s"), _fmt(a["teacher_gpu_hours"], "GPU-h"),
         _fmt(b["teacher_gpu_hours"], "GPU-h"), _source(model, "teacher_gpu_images_per_s")),
    ]
    lines = ["| stage | per 1M input rows | LAION-400M | LAION-2B | measured in |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["", "Assumptions:", ""] + [f"- {x}" for x in model["assumptions"]]
    return "\n".join(lines) + "\n"


def _source(model: dict, name: str) -> str:
    figure = model["inputs"][name]
    return figure["source"] if figure["value"] is not None else f"{figure['source']}: absent (no GPU when measured)"


def _fmt(value, unit: str) -> str:
    return value if value == NOT_MEASURED else f"{value:,} {unit}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flickr-photos", type=int, default=500, help="Flickr8k photos re-encoded for the JPEG size")
    a = ap.parse_args(argv)
    model = cost_model(measure_jpeg_sizes(a.flickr_photos))
    (RESULTS / "cost.json").write_text(json.dumps(model, indent=2) + "\n")
    text = markdown(model)
    (RESULTS / "cost.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
