"""Retry only the downloads of a finished filter output that failed for a transient reason.

    .venv/bin/catcurate retry-downloads --output out/filter   # spark-submit underneath, local[2] by default
    .venv/bin/python -c "from jobs.retry_downloads import retry_failed_downloads; retry_failed_downloads('out/filter')"

Picks the rows whose ledger says the download failed for a transient reason (timeout, connection
error, DNS, HTTP 5xx / 429 / 408: pipeline.filter.retry.transient; not a 404 or another 4xx, not a
blocked address, not bytes that are no image), fetches just those with img2dataset (the download
options the output was made with), runs them through the text-spot stage, and finishes the output
again (ledger check, stats.json, report.html, DataComp subset file): the result is what a fresh run in
which those downloads had succeeded writes. Rows already decided are not touched. Each run is one
attempt, recorded in manifest.json and stats.json ("retries"); run it again for another attempt.
Steps are marked: a killed attempt resumes when the command is run again.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # spark-submit runs us as a file

import schemas as S  # noqa: E402
from jobs.cat_filter import _finalize, _routes, print_funnel, write_datacomp_subset  # noqa: E402
from jobs.redecide import replan  # noqa: E402
from pipeline.filter import retry as RT  # noqa: E402
from pipeline.filter.download import DownloadParams, run_download  # noqa: E402
from pipeline.filter.image_stage import ImageStageParams, rows_from_download_shard, run_image_part  # noqa: E402
from pipeline.filter.redecide import NotRedecidable  # noqa: E402
from pipeline.store import partitions as P  # noqa: E402
from pipeline.store import storage  # noqa: E402
from pipeline.store.locks import LockHeld, LockLost, folder_lock  # noqa: E402


def retry_failed_downloads(output: str, *, spark=None, examples_per_reason: int = 8) -> dict:
    """One retry attempt on OUTPUT (a finished filter output with a download stage); returns its new stats."""
    output = storage.normalize(output)
    with folder_lock(output, "retry_downloads") as lock:
        return _retry_locked(output, lock, spark, examples_per_reason)


def _retry_locked(output, lock, spark, examples_per_reason) -> dict:
    t0 = time.time()
    manifest_path = storage.join(output, "manifest.json")
    if not storage.exists(manifest_path):
        raise P.InputError(f"{output} is not a filter output (no manifest.json)")
    manifest = storage.read_json(manifest_path)
    identity = manifest.get("resume_identity", {})
    if "finished" not in manifest:
        raise P.InputError(f"{output} is not finished: resume it with the same make filter command first")
    if manifest.get("job") != "cat_filter" or not identity.get("download"):
        raise P.InputError(f"{output} has no download stage (made by {manifest.get('job')}, stages "
                           f"{identity.get('stages')}): nothing to retry")
    if identity.get("output_format", "parquet") != "parquet":
        raise P.InputError(f"{output} also holds webdataset tars, which a retry would renumber; retry a Parquet-only "
                           f"output, then write the tars with python -m pipeline.store.webdataset")
    params = DownloadParams(**identity["download"])
    image = ImageStageParams.from_dict(identity["image"])
    try:
        plan = replan(output, manifest)   # the input, unchanged: stats and the report read it
    except NotRedecidable as e:
        raise P.InputError(str(e)) from None
    kinds = set(_routes(plan, identity["stages"]).values())
    if spark is None:
        from jobs.spark import get_spark
        spark = get_spark("retry_downloads")
    sc = spark.sparkContext

    attempt = 1
    while storage.exists(storage.join(output, "_done", "retry", f"{attempt:03d}.json")):
        attempt += 1
    root = RT.attempt_root(output, attempt)
    download_marker = storage.join(output, "_done", "download.json")
    shards = storage.read_json(download_marker)["shards"]
    fetched_marker = storage.join(root, "downloaded.json")
    if not storage.exists(fetched_marker):
        lock.check()
        parts = ["d" + s[: -len(".parquet")] for s in shards]
        sc.setJobDescription(f"retry {attempt}: transient download failures")
        selected = sum(sc.parallelize(parts, max(1, len(parts))).map(lambda p: RT.select_part(output, p, root))
                       .collect()) if parts else 0
        fetched = []
        if selected:
            storage.remove_tree(storage.join(root, "_work", "images"))   # a killed attempt's partial fetch: again
            distributor = "multiprocessing" if sc.master.startswith("local") else "pyspark"
            for s in run_download(root, params, distributor, identity["rows_per_part"]):
                name = RT.retry_shard_name(attempt, storage.basename(s))
                storage.write_bytes(storage.join(output, "_work", "images", name), storage.read_bytes(s))
                fetched.append(name)
        P.atomic_write_json({"selected": selected, "shards": fetched, "from": parts}, fetched_marker)
    info = storage.read_json(fetched_marker)
    print(f"[retry_downloads] attempt {attempt}: {info['selected']:,} transient download failures re-fetched",
          flush=True)

    lock.check()
    items = [("d" + name[: -len(".parquet")], storage.join(output, "_work", "images", name)) for name in info["shards"]]
    done = P.done_parts(output, S.STAGE_TEXTSPOT)
    todo = [it for it in items if it[0] not in done]
    if todo:
        sc.setJobDescription(f"retry {attempt}: text-spot stage on the re-fetched images")
        sc.parallelize(todo, len(todo)).map(
            lambda it: run_image_part(it[0], rows_from_download_shard(it[1], output), output, image)).collect()
    if info["selected"]:
        sc.setJobDescription(f"retry {attempt}: retried rows leave their old shards")
        sc.parallelize(info["from"], len(info["from"])).map(lambda p: RT.prune_part(output, p, root)).collect()
        now = shards + [s for s in info["shards"] if s not in shards]
        if now != shards:
            P.atomic_write_json({**storage.read_json(download_marker), "shards": now}, download_marker)

    stats = _finalize(spark, output, plan, kinds, examples_per_reason)
    stats.update(write_datacomp_subset(spark, output, plan.columns, stats))
    retry_ledger = [storage.join(output, "ledger", S.STAGE_TEXTSPOT, f"{p}.parquet") for p, _ in items]
    still = 0
    if retry_ledger:
        t = storage.read_parquet(retry_ledger, columns=["stage", "status"])
        still = sum(1 for sg, st in zip(*(t.column(c).to_pylist() for c in ("stage", "status")))
                    if sg == S.STAGE_DOWNLOAD and st == S.FAILED)
    record = {"attempt": attempt, "selected": info["selected"], "recovered": info["selected"] - still,
              "still_failed": still, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    manifest = storage.read_json(manifest_path)
    manifest["retries"] = [r for r in manifest.get("retries", []) if r["attempt"] != attempt] + [record]
    manifest["stats"] = {k: stats[k] for k in ("n_input", "n_kept", "n_dropped", "n_failed")}
    P.atomic_write_json(manifest, manifest_path)
    stats["retries"] = manifest["retries"]
    stats["seconds"] = round(time.time() - t0, 1)
    P.atomic_write_json(stats, storage.join(output, "stats.json"))
    P.atomic_write_json(record, storage.join(output, "_done", "retry", f"{attempt:03d}.json"))   # last: the commit
    storage.remove_tree(root)
    print(f"[retry_downloads] attempt {attempt}: {record['recovered']:,} of {record['selected']:,} recovered, "
          f"{still:,} failed again", flush=True)
    print_funnel(stats, output)
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="retry_downloads.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="a finished filter output (make filter's OUTPUT)")
    a = ap.parse_args(argv)
    try:
        retry_failed_downloads(a.output)
    except (P.InputError, LockHeld, LockLost, P.StorageError, storage.StorageAccessError) as e:
        print(f"retry_downloads: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
