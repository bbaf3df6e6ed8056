"""Re-decide a finished CAT filter output with new thresholds from its stored evidence, or sweep a grid.

    make redecide OUTPUT=out/filter INTO=out/filter-c2 DECIDE_ARGS="--min-complexity 2 --min-conf 0.7 --min-chars 4"
    spark-submit jobs/redecide.py --source out/filter --into out/filter-c2 --min-complexity 2 --min-conf 0.7
    spark-submit jobs/redecide.py --source out/filter --into out/sweep --sweep --grid-min-conf 0.5,0.6,0.7,0.8,0.9
    python -c "from jobs.redecide import redecide; redecide('out/filter', 'out/filter-c2', min_complexity=2)"

Nothing is parsed, downloaded or text-spotted again: the caption verdicts are re-taken from the
stored parses (captions/), the text-spot rule is applied to every stored detection (ocr/), through
the filter's own stage code (pipeline.image_stage.run_image_part with `stored` detections) and its
own finalisation (stats, ledger checks, report), so INTO is what a fresh `make filter` with those
thresholds writes: captions/, ledger/, ocr/, shards/ (image bytes copied from the input, or from
the source's downloaded shards, so INTO is self-contained), stats.json, report.html and a
manifest.json saying what it was derived from. Which thresholds can change: pipeline/redecide.py.
--sweep writes INTO/sweep.csv, sweep.json and sweep.png: per grid point the counts, the keep rate
and, when the input has a noise-label column (--noise-col), per noise type the share removed and
the share of clean pairs lost.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # spark-submit runs us as a file

import pyarrow.parquet as pq  # noqa: E402

import schemas as S  # noqa: E402
from jobs.cat_filter import _finalize, _read_ledger, _routes, _versions, print_funnel  # noqa: E402
from pipeline import partitions as P  # noqa: E402
from pipeline import redecide as R  # noqa: E402
from pipeline.image_stage import read_evidence, rows_from_chunk, rows_from_download_shard, run_image_part  # noqa: E402

DEFAULT_GRID = {"min_conf": [0.5, 0.6, 0.7, 0.8, 0.9], "min_chars": [3, 4, 5, 6, 8]}


def load_source(source: str) -> dict:
    """The source output's manifest; it must be a finished filter (or redecide) run."""
    path = os.path.join(source, "manifest.json")
    if not os.path.exists(path):
        raise R.NotRedecidable(f"{source} is not a filter output (no manifest.json)")
    with open(path) as fh:
        manifest = json.load(fh)
    if "finished" not in manifest:
        raise R.NotRedecidable(f"{source} is not finished (resume it with make filter first)")
    return manifest


def replan(source: str, manifest: dict, need_input: bool = True) -> P.Plan | None:
    """The source run's input plan, re-made from the input's footers; the input must be unchanged."""
    ident = manifest["resume_identity"]
    recorded = list(manifest.get("columns", {}).values())
    names = {}
    if recorded and all(c == recorded[0] for c in recorded):  # same columns everywhere: name them
        names = {f"{k}_col": recorded[0].get(k) for k in ("caption", "url", "key", "image")}
    try:
        plan = P.plan_input(ident["input"]["path"], ident["rows_per_part"], bool(manifest.get("bad_files")),
                            work_dir=source, input_format=ident["input"].get("format", "auto"), **names)
    except P.InputError as e:
        if need_input:
            raise R.NotRedecidable(f"the source's input cannot be read ({e}); the image bytes come from it") from e
        return None
    if plan.fingerprint != ident["input"]["fingerprint"]:
        raise R.NotRedecidable(f"the input {ident['input']['path']} changed since {source} was written "
                               f"(fingerprint {ident['input']['fingerprint']} -> {plan.fingerprint})")
    return plan


def _run_parts(sc, into: str, stage: str, items: list, fn, label: str, seconds: dict) -> None:
    t = time.time()
    done = P.done_parts(into, stage)
    todo = [it for it in items if it[0] not in done]
    print(f"[redecide] {label}: {len(items) - len(todo)} of {len(items)} parts already done, running {len(todo)}",
          flush=True)
    if todo:
        sc.setJobDescription(label)
        sc.parallelize(todo, len(todo)).map(fn).collect()  # per-part counts only
    seconds[stage] = round(seconds.get(stage, 0) + time.time() - t, 2)


def redecide(source: str, into: str, *, examples_per_reason: int = 8, spark=None, **changes) -> dict:
    """Write INTO as a fresh filter run on the source's input with `changes` (threshold=value, e.g.
    min_complexity=2, min_conf=0.7) would; returns its stats. R.NotRedecidable when the stored
    evidence cannot support a change."""
    t0 = time.time()
    source, into = os.path.abspath(source), os.path.abspath(into)
    if source == into:
        raise R.NotRedecidable("INTO must be another folder than the source output")
    manifest = load_source(source)
    identity = manifest["resume_identity"]
    caption, image = R.apply_changes(*R.source_params(identity), changes)
    plan = replan(source, manifest)
    route = _routes(plan, identity["stages"])
    kinds = set(route.values())
    new_identity = {**identity, "caption": asdict(caption), "image": image.to_dict() if image else None}
    P.check_resume(into, new_identity)
    os.makedirs(into, exist_ok=True)
    P.remove_stale_temporaries(into)
    out_manifest = {"job": "redecide", "resume_identity": new_identity, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "derived_from": {"output": source, "job": manifest.get("job"), "finished": manifest["finished"],
                                     "thresholds": R.params_record(*R.source_params(identity)), "changes": changes},
                    "argv": sys.argv, "versions": _versions(), "bad_files": plan.bad_files,
                    "columns": {f: asdict(c) for f, c in plan.columns.items()},
                    "evidence": R.evidence_summary(caption, image if kinds - {"caption"} else None)}
    P.atomic_write_json(out_manifest, os.path.join(into, "manifest.json"))

    if spark is None:
        from jobs.spark import get_spark
        spark = get_spark("redecide")
    sc, seconds = spark.sparkContext, {}
    items = [(c.part, c.to_dict(), asdict(plan.columns[c.path])) for c in plan.chunks]
    _run_parts(sc, into, S.STAGE_CAPTION, items,
               lambda it: R.redecide_caption_part(source, into, it[0], caption), "caption verdicts from stored parses",
               seconds)
    image_items = [it for it in items if route[it[1]["path"]] == "images"]
    if image_items:
        _run_parts(sc, into, S.STAGE_TEXTSPOT, image_items,
                   lambda it: run_image_part(it[0], rows_from_chunk(P.Chunk.from_dict(it[1]), P.Columns(**it[2]), into),
                                             into, image, stored=read_evidence(source, it[0])),
                   "text-spot verdicts from stored detections, images from the input", seconds)
    if "download" in kinds:
        with open(os.path.join(source, "_done", "download.json")) as fh:
            shards = [os.path.join(source, "_work", "images", s) for s in json.load(fh)["shards"]]
        _run_parts(sc, into, S.STAGE_TEXTSPOT, [("d" + os.path.basename(s)[: -len(".parquet")], s) for s in shards],
                   lambda it: run_image_part(it[0], rows_from_download_shard(it[1], into), into, image,
                                             stored=read_evidence(source, it[0])),
                   "text-spot verdicts from stored detections, downloaded images", seconds)
    t = time.time()
    stats = _finalize(spark, into, plan, kinds, examples_per_reason)
    seconds["finalize_and_report"] = round(time.time() - t, 2)
    stats.update(seconds=round(time.time() - t0, 2), phase_seconds=seconds, derived_from=source)
    P.atomic_write_json(stats, os.path.join(into, "stats.json"))
    out_manifest.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                        stats={k: stats[k] for k in ("n_input", "n_kept", "n_dropped", "n_failed")})
    P.atomic_write_json(out_manifest, os.path.join(into, "manifest.json"))
    print_funnel(stats, into)
    return stats


def sweep(source: str, into: str, grid: dict[str, list] | None = None, *, noise_col: str = "noise",
          spark=None) -> list[dict]:
    """Counts, keep rate and (with noise labels) noise removed / clean lost at every point of `grid`
    ({threshold: values}); writes INTO/sweep.csv, sweep.json, sweep.png and returns the table."""
    from pyspark.sql import functions as F

    t0 = time.time()
    source, into = os.path.abspath(source), os.path.abspath(into)
    manifest = load_source(source)
    caption, image = R.source_params(manifest["resume_identity"])
    grid = dict(grid or {k: v for k, v in DEFAULT_GRID.items() if image is not None})
    grid = grid or {"min_complexity": [caption.min_complexity + i for i in range(3)]}
    points = R.grid_points(caption, image, grid)  # NotRedecidable before any work
    if spark is None:
        from jobs.spark import get_spark
        spark = get_spark("redecide-sweep")
    rows = (spark.read.schema(S.CAPTIONS.spark).parquet(os.path.join(source, "captions"))
            .select("key", "caption", *[f.name for f in S.PARSE_FIELDS],
                    F.col("passed").alias("c_passed"), F.col("reason").alias("c_reason"))
            .join(_read_ledger(spark, source).select("key", "status", "stage", "reason"), "key", "left"))
    if os.path.isdir(os.path.join(source, "ocr")):
        rows = rows.join(spark.read.schema(S.OCR.spark).parquet(os.path.join(source, "ocr")), "key", "left")
    labels = _noise_labels(spark, source, manifest, noise_col)
    if labels is not None:
        rows = rows.join(labels, "key", "left")
    counts = rows.rdd.mapPartitions(
        lambda it: [R.count_outcomes((r.asDict(recursive=True) for r in it), points, caption, image)]
    ).fold([Counter() for _ in points], R.merge_counts)
    table = R.sweep_table(points, counts)
    os.makedirs(into, exist_ok=True)
    P.atomic_write_json({"source": source, "grid": grid, "noise_col": noise_col if labels is not None else None,
                         "seconds": round(time.time() - t0, 2), "points": table}, os.path.join(into, "sweep.json"))
    with open(os.path.join(into, "sweep.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in table for k in r)))
        writer.writeheader()
        writer.writerows(table)
    R.plot_sweep(table, grid, os.path.join(into, "sweep.png"),
                 f"{os.path.basename(source)}: {table[0]['n_input']:,} pairs, CAT filter thresholds swept")
    print(f"[redecide] sweep of {len(points)} points in {time.time() - t0:.1f} s -> {into}/sweep.{{csv,json,png}}")
    return table


def _noise_labels(spark, source: str, manifest: dict, column: str):
    """(key, noise) of every input row whose file has `column`, or None when none has it."""
    plan = replan(source, manifest, need_input=False)
    if plan is None:
        return None
    chunks = [c for c in plan.chunks if column in pq.ParquetFile(c.path).schema_arrow.names]
    if not chunks:
        return None

    def labels(chunk):
        values = P.read_chunk(chunk, [column]).column(0).to_pylist()
        keys = pq.read_table(os.path.join(source, "captions", f"{chunk.part}.parquet"), columns=["key", "source_row"])
        return [(k, values[r - chunk.file_row_offset]) for k, r in zip(*keys.to_pydict().values())]

    rdd = spark.sparkContext.parallelize(chunks, len(chunks)).flatMap(labels)
    return spark.createDataFrame(rdd, "key string, noise string")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="redecide.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="a finished filter output (make filter's OUTPUT)")
    ap.add_argument("--into", required=True, help="new output folder (or, with --sweep, where the table goes)")
    g = ap.add_argument_group("new thresholds (default: the source's; see pipeline/redecide.py for what may change)")
    g.add_argument("--min-complexity", type=int)
    g.add_argument("--require-action", action="store_true", help="drop captions without an action")
    g.add_argument("--no-require-action", action="store_true", help="refused when the source required one")
    g.add_argument("--max-caption-chars", type=int)
    g.add_argument("--min-conf", type=float)
    g.add_argument("--min-chars", type=int)
    g.add_argument("--shard-rows", type=int)
    g.add_argument("--max-pixels", type=int, help="refused unless unchanged: decoding is part of the evidence")
    g = ap.add_argument_group("sweep")
    g.add_argument("--sweep", action="store_true", help="count every grid point instead of writing one output")
    g.add_argument("--grid-min-complexity", type=_ints)
    g.add_argument("--grid-min-conf", type=_floats, help=f"default {DEFAULT_GRID['min_conf']}")
    g.add_argument("--grid-min-chars", type=_ints, help=f"default {DEFAULT_GRID['min_chars']}")
    g.add_argument("--noise-col", default="noise", help="input column with noise labels, joined by key")
    a = ap.parse_args(argv)
    changes = {k: v for k, v in {"min_complexity": a.min_complexity, "max_caption_chars": a.max_caption_chars,
                                 "min_conf": a.min_conf, "min_chars": a.min_chars, "shard_rows": a.shard_rows,
                                 "max_pixels": a.max_pixels}.items() if v is not None}
    if a.require_action or a.no_require_action:
        changes["require_action"] = bool(a.require_action)
    try:
        if a.sweep:
            grid = {k: v for k, v in {"min_complexity": a.grid_min_complexity, "min_conf": a.grid_min_conf,
                                      "min_chars": a.grid_min_chars}.items() if v}
            sweep(a.source, a.into, grid or None, noise_col=a.noise_col)
        else:
            redecide(a.source, a.into, **changes)
    except (R.NotRedecidable, P.InputError, P.ParamsChanged) as e:
        print(f"redecide: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
