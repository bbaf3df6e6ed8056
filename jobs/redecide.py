"""Re-decide a finished CAT filter output with new thresholds from its stored evidence, or sweep a grid.

    make redecide OUTPUT=out/filter INTO=out/filter-c2 DECIDE_ARGS="--min-complexity 2 --min-conf 0.7 --min-chars 4"
    .venv/bin/catcurate redecide --source out/filter --into out/filter-c2 --min-complexity 2 --min-conf 0.7
    .venv/bin/catcurate redecide --source out/filter --into out/sweep --sweep --grid-min-conf 0.5,0.6,0.7,0.8,0.9
    .venv/bin/python -c "from jobs.redecide import redecide; redecide('out/filter', 'out/filter-c2', min_complexity=2)"

Nothing is parsed, downloaded or text-spotted again: the caption verdicts are re-taken from the
stored parses (captions/), the text-spot rule is applied to every stored detection (ocr/), through
the filter's own stage code (pipeline.filter.image_stage.run_image_part with `stored` detections) and its
own finalisation (stats, ledger checks, report), so INTO is what a fresh `make filter` with those
thresholds writes: captions/, ledger/, ocr/, shards/ (image bytes copied from the input, or from
the source's downloaded shards, so INTO is self-contained), stats.json, report.html and a
manifest.json saying what it was derived from. Which thresholds can change: pipeline/filter/redecide.py.
--sweep writes INTO/sweep.csv, sweep.json and sweep.png: per grid point the counts, the keep rate
and, when the input has a noise-label column (--noise-col), per noise type the share removed and
the share of clean pairs lost.

Two engines run the same code (pipeline.filter.redecide, pipeline.filter.image_stage.run_image_part with the
stored detections, pipeline.filter.finalize's rules) and write the same output:
  --engine local   in this process, part after part, finished by pipeline.filter.finalize with pyarrow: no
                   JVM, no Spark queries. Run it as `python jobs/redecide.py` (spark-submit starts a
                   JVM before Python runs: it doubled the local engine's time in bench/results/redecide).
  --engine spark   one Spark task per part, finished by jobs/cat_filter.py's Spark queries.
  --engine auto    (default) local when the source has at most LOCAL_MAX_ROWS input rows, else Spark.
Why 100,000: the local engine uses one core and holds the ledger (not the images) in memory, tens
of MB at that size. On 7,500 Flickr8k pairs it took 3.2 CPU-s (~0.4 ms a row, mostly decoding and
copying the images), the Spark engine 38 CPU-s, nearly all fixed cost (JVM, workers, queries).
Spark's two cores only pay back that fixed cost when half the per-row work exceeds it, at ~150,000
rows on a 2-core machine; below LOCAL_MAX_ROWS the local engine is the faster one.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections import Counter
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # spark-submit runs us as a file

import schemas as S  # noqa: E402
from jobs.cat_filter import _finalize, _read_ledger, _routes, _versions, print_funnel  # noqa: E402
from jobs.spark import read_parquet  # noqa: E402
from jobs.cat_filter import score_quantiles, write_datacomp_subset  # noqa: E402
from pipeline.filter import datacomp  # noqa: E402
from pipeline.filter import score_stage  # noqa: E402
from pipeline.filter import finalize as fin  # noqa: E402
from pipeline.store import storage  # noqa: E402
from pipeline.store import partitions as P  # noqa: E402
from pipeline.filter import redecide as R  # noqa: E402
from pipeline.filter.mask import TEXT_ACTIONS  # noqa: E402
from pipeline.filter.image_stage import (ChangedImage, read_digests, read_evidence, rows_from_chunk,  # noqa: E402
                                         rows_from_download_shard, run_image_part)

DEFAULT_GRID = {"min_conf": [0.5, 0.6, 0.7, 0.8, 0.9], "min_chars": [3, 4, 5, 6, 8]}
ENGINES = ("auto", "local", "spark")
LOCAL_MAX_ROWS = 100_000  # input rows up to which auto re-decides in this process (module docstring)


def choose_engine(engine: str, n_rows: int) -> str:
    """local or spark: `engine`, or for auto, by the number of input rows."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "local" if n_rows <= LOCAL_MAX_ROWS else "spark"
    return engine


def _spark(spark, app_name: str):
    if spark is None:
        from jobs.spark import get_spark
        spark = get_spark(app_name)
    return spark


def load_source(source: str) -> dict:
    """The source output's manifest; it must be a finished filter (or redecide) run."""
    path = storage.join(source, "manifest.json")
    if not storage.exists(path):
        raise R.NotRedecidable(f"{source} is not a filter output (no manifest.json)")
    manifest = P.read_manifest(path)
    if "finished" not in manifest:
        raise R.NotRedecidable(f"{source} is not finished (resume it with make filter first)")
    ident = manifest.get("resume_identity") or {}
    missing = [k for k in ("input", "stages", "rows_per_part", "caption") if k not in ident]
    missing += [f"input.{k}" for k in ("path", "fingerprint") if k not in (ident.get("input") or {})]
    if missing:
        raise R.NotRedecidable(f"{path} is not a manifest this product wrote (no {', '.join(missing)} in its "
                               f"resume_identity); restore it or run the filter again")
    return manifest


def check_evidence(source: str, parts: list[str], image_parts: list[str]) -> None:
    """Every part's stored evidence is there (captions/, ledger/caption/, ocr/), before anything is written
    into INTO: a deleted file is named, never read as zero rows."""
    missing = []
    for folder, names in ((("captions",), parts), (("ledger", S.STAGE_CAPTION), parts), (("ocr",), image_parts)):
        present = set(storage.listdir(storage.join(source, *folder)))
        missing += [storage.join(source, *folder, f"{p}.parquet") for p in names if f"{p}.parquet" not in present]
    if missing:
        raise R.NotRedecidable(f"{len(missing)} evidence file(s) of {source} are missing: "
                               f"{', '.join(missing[:3])}{' and more' if len(missing) > 3 else ''}; "
                               f"restore them or run the filter again")


def replan(source: str, manifest: dict, need_input: bool = True) -> P.Plan | None:
    """The source run's input plan, re-made from the input's footers; the input must be unchanged."""
    ident = manifest["resume_identity"]
    recorded = list(manifest.get("columns", {}).values())
    names = {}
    if recorded and all(c == recorded[0] for c in recorded):  # same columns everywhere: name them
        names = {f"{k}_col": recorded[0].get(k) for k in ("caption", "url", "key", "image")}
    try:
        changed = P.changed_files(ident["input"].get("content"),
                                  P.input_content(ident["input"]["path"], ident["input"].get("format", "auto")))
        if changed:   # checked before the input is planned (a text input would be converted again) or copied
            raise R.NotRedecidable(
                f"input file(s) changed since {source} was written: {', '.join(changed[:5])}"
                f"{' and more' if len(changed) > 5 else ''} (under {ident['input']['path']}); its evidence describes "
                f"the old content. Run the filter afresh on just the changed file(s) into a new OUTPUT.")
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


def _run_parts(spark, into: str, stage: str, items: list, fn, label: str, seconds: dict) -> None:
    """fn on every part not done yet: one Spark task each, or (spark None: the local engine) in turn here."""
    t = time.time()
    done = P.done_parts(into, stage)
    todo = [it for it in items if it[0] not in done]
    print(f"[redecide] {label}: {len(items) - len(todo)} of {len(items)} parts already done, running {len(todo)}",
          flush=True)
    if todo and spark is not None:
        spark.sparkContext.setJobDescription(label)
        spark.sparkContext.parallelize(todo, len(todo)).map(fn).collect()  # per-part counts only
    elif todo:
        for it in todo:
            fn(it)
    seconds[stage] = round(seconds.get(stage, 0) + time.time() - t, 2)


def redecide(source: str, into: str, *, examples_per_reason: int = 8, spark=None, engine: str = "auto",
             **changes) -> dict:
    """Write INTO as a fresh filter run on the source's input with `changes` (threshold=value, e.g.
    min_complexity=2, min_conf=0.7, text_action="mask") would; returns its stats. R.NotRedecidable when the stored
    evidence cannot support a change. engine: local, spark or auto (module docstring); `spark` is
    the session the Spark engine uses (made when None)."""
    t0 = time.time()
    source, into = storage.normalize(source), storage.normalize(into)
    if source == into:
        raise R.NotRedecidable("INTO must be another folder than the source output")
    manifest = load_source(source)
    identity = manifest["resume_identity"]
    P.check_apart({"SOURCE": source, "the source's INPUT": identity["input"]["path"]}, {"INTO": into})
    score_changes = {k: changes.pop(k) for k in ("min_score", "score_top_fraction") if k in changes}
    caption, image = R.apply_changes(*R.source_params(identity), changes)
    plan = replan(source, manifest)
    engine = choose_engine(engine, plan.n_rows)
    route = _routes(plan, identity["stages"])
    kinds = set(route.values())
    new_identity = {**identity, "caption": asdict(caption), "image": image.to_dict() if image else None}
    score, score_rules, spark = _rescore(manifest, plan, score_changes, spark)
    if score.enabled:   # a score stage added to a source without one runs first, as in a fresh run
        new_identity["score"] = score.to_dict()
        if identity["stages"] not in ("auto", "all") and S.STAGE_SCORE not in identity["stages"].split(","):
            new_identity["stages"] = f"{S.STAGE_SCORE},{identity['stages']}"
    image_parts = [c.part for c in plan.chunks if route[c.path] == "images"]
    if "download" in kinds:
        image_parts += ["d" + s[: -len(".parquet")]
                        for s in storage.read_json(storage.join(source, "_done", "download.json"))["shards"]]
    check_evidence(source, [c.part for c in plan.chunks], image_parts)
    P.check_resume(into, new_identity)
    storage.makedirs(into)
    P.remove_stale_temporaries(into)
    out_manifest = {"job": "redecide", "resume_identity": new_identity, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "derived_from": {"output": source, "job": manifest.get("job"), "finished": manifest["finished"],
                                     "thresholds": R.params_record(*R.source_params(identity)), "changes": changes},
                    "engine": engine, "argv": sys.argv, "versions": _versions(), "bad_files": plan.bad_files,
                    "columns": {f: asdict(c) for f, c in plan.columns.items()},
                    "evidence": R.evidence_summary(caption, image if kinds - {"caption"} else None)}
    if score_rules:
        out_manifest["score"] = score_stage.thresholds_record(score_rules)
    P.atomic_write_json(out_manifest, storage.join(into, "manifest.json"))

    spark = _spark(spark, "redecide") if engine == "spark" else None
    rule_dicts = [r.to_dict() for r in score_rules]
    seconds = {}
    items = [(c.part, c.to_dict(), asdict(plan.columns[c.path])) for c in plan.chunks]
    _run_parts(spark, into, S.STAGE_CAPTION, items,
               lambda it: R.redecide_caption_part(source, into, it[0], caption,
                                                  score=(it[1], rule_dicts) if rule_dicts else None,
                                                  caption_rules=score_stage.caption_rules_run(new_identity["stages"]),
                                                  final=route[it[1]["path"]] == "caption"),
               "caption verdicts from stored parses",
               seconds)
    image_items = [it for it in items if route[it[1]["path"]] == "images"]
    if image_items:
        _run_parts(spark, into, S.STAGE_TEXTSPOT, image_items,
                   lambda it: run_image_part(it[0], rows_from_chunk(P.Chunk.from_dict(it[1]), P.Columns(**it[2]), into),
                                             into, image, stored=read_evidence(source, it[0]),
                                             stored_digests=read_digests(source, it[0])),
                   "text-spot verdicts from stored detections, images from the input", seconds)
    if "download" in kinds:
        shards = [storage.join(source, "_work", "images", s)
                  for s in storage.read_json(storage.join(source, "_done", "download.json"))["shards"]]
        _run_parts(spark, into, S.STAGE_TEXTSPOT, [("d" + storage.basename(s)[: -len(".parquet")], s) for s in shards],
                   lambda it: run_image_part(it[0], rows_from_download_shard(it[1], into), into, image,
                                             stored=read_evidence(source, it[0]),
                                             stored_digests=read_digests(source, it[0])),
                   "text-spot verdicts from stored detections, downloaded images", seconds)
    t = time.time()
    if engine == "spark":
        stats = _finalize(spark, into, plan, kinds, examples_per_reason)
    else:
        stats = fin.finalize(into, plan, kinds, examples_per_reason)
    seconds["finalize_and_report"] = round(time.time() - t, 2)
    if datacomp.uid_keyed(plan.columns):   # the subset file, as the filter writes it
        stats.update(write_datacomp_subset(spark, into, plan.columns, stats) if spark is not None
                     else datacomp.write_subset(into, stats["n_kept"]))
    stats.update(seconds=round(time.time() - t0, 2), phase_seconds=seconds, derived_from=source, engine=engine)
    P.atomic_write_json(stats, storage.join(into, "stats.json"))
    out_manifest.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                        stats={k: stats[k] for k in ("n_input", "n_kept", "n_dropped", "n_failed")})
    P.atomic_write_json(out_manifest, storage.join(into, "manifest.json"))
    print_funnel(stats, into)
    return stats


def _merge_score(old: score_stage.ScoreParams, changes: dict) -> score_stage.ScoreParams:
    """The source's score filters with `changes` applied per column ({"min_score": [(column, threshold)],
    "score_top_fraction": [(column, fraction)]}: a named column's value replaced or added)."""
    fixed, top = dict(old.min_score), dict(old.top_fraction)
    fixed.update(dict(changes.get("min_score") or []))
    top.update(dict(changes.get("score_top_fraction") or []))
    return score_stage.ScoreParams(tuple(fixed.items()), tuple(top.items()))


def _rescore(manifest: dict, plan, changes: dict, spark):
    """(score params, rules, spark) of INTO: the source's rules, or with `changes` new ones; a changed top
    fraction's quantile computed over the input as the filter does (a Spark session started for it).
    NotRedecidable when a change would pass rows the source never parsed or fetched."""
    identity = manifest["resume_identity"]
    old = score_stage.ScoreParams.from_dict(identity.get("score"))
    old_rules = [score_stage.Rule.from_dict(r) for r in (manifest.get("score") or {}).get("rules", [])]
    if not changes:
        return old, old_rules, spark
    new = _merge_score(old, changes)
    score_stage.check_columns(plan, new)
    known = {(r.column, r.fraction): r for r in old_rules if r.fraction is not None}
    caption_ran = identity["stages"] != S.STAGE_SCORE
    provisional = score_stage.resolve_rules(new, [known[(c, f)].threshold if (c, f) in known else None
                                                  for c, f in new.top_fraction])   # unknown quantiles: strictest
    problems = score_stage.check_redecidable(old, new, old_rules, provisional, caption_ran)
    if problems:   # refused before any quantile is computed
        raise R.NotRedecidable("the stored evidence cannot support: " + "; ".join(problems)
                               + ". Run the filter again (make filter) for these.")
    requests = [(c, 1 - f) for c, f in new.top_fraction if (c, f) not in known]
    computed = {}
    if requests:
        spark = _spark(spark, "redecide")
        computed = dict(zip(requests, score_quantiles(spark, plan.chunks, requests)))
    quantiles = [known[(c, f)].threshold if (c, f) in known else computed[(c, 1 - f)] for c, f in new.top_fraction]
    rules = score_stage.resolve_rules(new, [None if q is not None and q == float("inf") else q for q in quantiles])
    problems = score_stage.check_redecidable(old, new, old_rules, rules, caption_ran)
    if problems:
        raise R.NotRedecidable("the stored evidence cannot support: " + "; ".join(problems)
                               + ". Run the filter again (make filter) for these.")
    return new, rules, spark


def sweep(source: str, into: str, grid: dict[str, list] | None = None, *, noise_col: str = "noise",
          spark=None, engine: str = "auto") -> list[dict]:
    """Counts, keep rate and (with noise labels) noise removed / clean lost at every point of `grid`
    ({threshold: values}); writes INTO/sweep.csv, sweep.json, sweep.png and returns the table.
    engine: local, spark or auto, as for redecide."""
    t0 = time.time()
    source, into = storage.normalize(source), storage.normalize(into)
    manifest = load_source(source)
    caption, image = R.source_params(manifest["resume_identity"])
    grid = dict(grid or {k: v for k, v in DEFAULT_GRID.items() if image is not None})
    grid = grid or {"min_complexity": [caption.min_complexity + i for i in range(3)]}
    points = R.grid_points(caption, image, grid)  # NotRedecidable before any work
    engine = choose_engine(engine, manifest["resume_identity"]["input"]["n_rows"])
    if engine == "local":
        labels = _noise_labels_local(source, manifest, noise_col)
        counts = R.count_outcomes(_evidence_rows_local(source, labels), points, caption, image)
    else:
        counts, labels = _count_with_spark(_spark(spark, "redecide-sweep"), source, manifest, noise_col, points,
                                           caption, image)
    table = R.sweep_table(points, counts)
    storage.makedirs(into)
    P.atomic_write_json({"source": source, "grid": grid, "noise_col": noise_col if labels is not None else None,
                         "engine": engine, "seconds": round(time.time() - t0, 2), "points": table},
                        storage.join(into, "sweep.json"))
    with storage.open(storage.join(into, "sweep.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in table for k in r)))
        writer.writeheader()
        writer.writerows(table)
    R.plot_sweep(table, grid, storage.join(into, "sweep.png"),
                 f"{storage.basename(source)}: {table[0]['n_input']:,} pairs, CAT filter thresholds swept")
    print(f"[redecide] sweep of {len(points)} points in {time.time() - t0:.1f} s ({engine} engine) "
          f"-> {into}/sweep.{{csv,json,png}}")
    return table


def _count_with_spark(spark, source: str, manifest: dict, noise_col: str, points, caption, image):
    """count_outcomes over the source's evidence, joined and counted by Spark; (counts, noise labels or None)."""
    from pyspark.sql import functions as F

    rows = (read_parquet(spark, storage.join(source, "captions"), S.CAPTIONS)
            .select("key", "caption", *[f.name for f in S.PARSE_FIELDS],
                    F.col("passed").alias("c_passed"), F.col("reason").alias("c_reason"))
            .join(_read_ledger(spark, source).select("key", "status", "stage", "reason"), "key", "left"))
    if storage.isdir(storage.join(source, "ocr")):
        rows = rows.join(read_parquet(spark, storage.join(source, "ocr"), S.OCR), "key", "left")
    labels = _noise_labels(spark, source, manifest, noise_col)
    if labels is not None:
        rows = rows.join(labels, "key", "left")
    counts = rows.rdd.mapPartitions(
        lambda it: [R.count_outcomes((r.asDict(recursive=True) for r in it), points, caption, image)]
    ).fold([Counter() for _ in points], R.merge_counts)
    return counts, labels


def _labelled_chunks(source: str, manifest: dict, column: str) -> list[P.Chunk]:
    """The source's input parts whose file has the noise-label `column` (none when the input is gone)."""
    plan = replan(source, manifest, need_input=False)
    if plan is None:
        return []
    return [c for c in plan.chunks if column in storage.parquet_file(c.path).schema_arrow.names]


def _chunk_labels(source: str, chunk: P.Chunk, column: str) -> list[tuple[str, str]]:
    """(key, label) of one input part, the key from the source's captions/ by source row."""
    values = P.read_chunk(chunk, [column]).column(0).to_pylist()
    keys = storage.read_parquet(storage.join(source, "captions", f"{chunk.part}.parquet"), columns=["key", "source_row"])
    return [(k, values[r - chunk.file_row_offset]) for k, r in zip(*keys.to_pydict().values())]


def _noise_labels(spark, source: str, manifest: dict, column: str):
    """(key, noise) of every input row whose file has `column`, as a DataFrame; None when none has it."""
    chunks = _labelled_chunks(source, manifest, column)
    if not chunks:
        return None
    rdd = spark.sparkContext.parallelize(chunks, len(chunks)).flatMap(lambda c: _chunk_labels(source, c, column))
    return spark.createDataFrame(rdd, "key string, noise string")


def _noise_labels_local(source: str, manifest: dict, column: str) -> dict[str, str] | None:
    chunks = _labelled_chunks(source, manifest, column)
    return dict(kv for c in chunks for kv in _chunk_labels(source, c, column)) if chunks else None


def _evidence_rows_local(source: str, labels: dict[str, str] | None):
    """The rows count_outcomes takes, as the Spark engine's joins make them: every captions row with
    its parse and caption verdict (c_passed, c_reason), its ledger verdict, its stored detections and
    its noise label; the ledger and detections are held in memory, captions/ is read part by part."""
    ledger = fin.read_ledger(source, ["key", "status", "stage", "reason"]).to_pydict()
    verdicts = {k: v for k, *v in zip(ledger["key"], ledger["status"], ledger["stage"], ledger["reason"])}
    ocr = storage.read_parquet(storage.join(source, "ocr"), schema=S.OCR.arrow).to_pydict()
    detections = dict(zip(ocr["key"], ocr["detections"]))
    columns = ["key", "caption", *[f.name for f in S.PARSE_FIELDS], "passed", "reason"]
    for path in storage.files(storage.join(source, "captions"), ".parquet"):
        for r in storage.read_parquet(path, schema=S.CAPTIONS.arrow, columns=columns).to_pylist():
            r["c_passed"], r["c_reason"] = r.pop("passed"), r.pop("reason")
            r["status"], r["stage"], r["reason"] = verdicts.get(r["key"], (None, None, None))
            r["detections"] = detections.get(r["key"])
            if labels is not None:
                r["noise"] = labels.get(r["key"])
            yield r


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="redecide.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="a finished filter output (make filter's OUTPUT)")
    ap.add_argument("--into", required=True, help="new output folder (or, with --sweep, where the table goes)")
    g = ap.add_argument_group("new thresholds (default: the source's; see pipeline/filter/redecide.py for what may change)")
    g.add_argument("--min-complexity", type=int)
    g.add_argument("--require-action", action="store_true", help="drop captions without an action")
    g.add_argument("--no-require-action", action="store_true", help="refused when the source required one")
    g.add_argument("--max-caption-chars", type=int)
    g.add_argument("--min-conf", type=float)
    g.add_argument("--min-chars", type=int)
    g.add_argument("--shard-rows", type=int)
    g.add_argument("--text-action", choices=TEXT_ACTIONS,
                   help="drop the pairs whose image shows their caption, or keep them with that text masked "
                        "(switches either way: every detection is stored with its box)")
    g.add_argument("--max-pixels", type=int, help="refused unless unchanged: decoding is part of the evidence")
    g.add_argument("--min-score", action="append", default=[], metavar="COLUMN=THRESHOLD",
                   help="score filter threshold for COLUMN (replaces the source's for that column; at least as "
                        "strict unless the source ran --stages score alone)")
    g.add_argument("--score-top-fraction", action="append", default=[], metavar="COLUMN=F",
                   help="keep the top F of the input by COLUMN (at most the source's fraction, likewise)")
    g = ap.add_argument_group("sweep")
    g.add_argument("--sweep", action="store_true", help="count every grid point instead of writing one output")
    g.add_argument("--grid-min-complexity", type=_ints)
    g.add_argument("--grid-min-conf", type=_floats, help=f"default {DEFAULT_GRID['min_conf']}")
    g.add_argument("--grid-min-chars", type=_ints, help=f"default {DEFAULT_GRID['min_chars']}")
    g.add_argument("--noise-col", default="noise", help="input column with noise labels, joined by key")
    ap.add_argument("--engine", choices=ENGINES, default="auto",
                    help=f"local: in this process, no Spark; spark: Spark tasks; auto: local up to "
                         f"{LOCAL_MAX_ROWS:,} input rows (default auto)")
    a = ap.parse_args(argv)
    from jobs.spark import failed_job_exit, install_interrupt_handlers, user_stderr
    install_interrupt_handlers()   # until a Spark session exists (which installs them again, with itself)
    to_person = user_stderr()      # opened now: under spark-submit the JVM may be gone when it is needed
    changes = {k: v for k, v in {"min_complexity": a.min_complexity, "max_caption_chars": a.max_caption_chars,
                                 "min_conf": a.min_conf, "min_chars": a.min_chars, "shard_rows": a.shard_rows,
                                 "max_pixels": a.max_pixels, "text_action": a.text_action}.items() if v is not None}
    try:
        if a.min_score:
            changes["min_score"] = [score_stage.parse_assignment(x, "--min-score") for x in a.min_score]
        if a.score_top_fraction:
            changes["score_top_fraction"] = [score_stage.parse_assignment(x, "--score-top-fraction")
                                             for x in a.score_top_fraction]
    except ValueError as e:
        print(f"redecide: error: {e}", file=sys.stderr)
        return 2
    if a.require_action or a.no_require_action:
        changes["require_action"] = bool(a.require_action)
    try:
        if a.sweep:
            grid = {k: v for k, v in {"min_complexity": a.grid_min_complexity, "min_conf": a.grid_min_conf,
                                      "min_chars": a.grid_min_chars}.items() if v}
            sweep(a.source, a.into, grid or None, noise_col=a.noise_col, engine=a.engine)
        else:
            redecide(a.source, a.into, engine=a.engine, **changes)
    except (R.NotRedecidable, P.InputError, P.ParamsChanged, ChangedImage) as e:
        print(f"redecide: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Exception) as e:  # noqa: BLE001 - Ctrl-C / SIGTERM, or the same errors raised
        message = None if isinstance(e, KeyboardInterrupt) else \
            P.task_error(e, ("ChangedImage", "NotRedecidable", "InputError"))   # in a Spark task, wrapped in Java's
        if message is None:
            return failed_job_exit(e, "redecide", f"finished parts are kept in {a.into}", to_person)
        print(f"redecide: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
