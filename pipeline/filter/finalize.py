"""Finishing a CAT filter output: the rules shared by the Spark job and the in-process (local) engine.

    from pipeline.filter.finalize import finalize
    stats = finalize("out/filter-c2", plan, kinds={"images"}, examples_per_reason=8)   # no Spark

Once every stage has written its parts, an output is finished by: reconciling the ledger (a
captions row no stage decided becomes a failed ledger row, loudly, instead of vanishing), checking
the ledger invariant (one row per key), counting outcomes per (stage, status, reason) into
stats.json (build_stats), and writing report.html with a few example rows per reason.

jobs/cat_filter.py's `_finalize` does this with Spark queries, for outputs of any size; `finalize`
here does it with pyarrow in one process, for outputs that fit on the driver (jobs/redecide.py's
local engine). The rules are written once, here, and both use them: the reconciliation row
(UNACCOUNTED), the invariant's error (duplicate_keys_error), the stats (build_stats, finish_stats)
and the report's example selection (select_examples, write_report_with_examples). Spark only
narrows the candidates of the example selection down before collecting them; the choice itself is
made by select_examples on the driver, so both engines write the same report.html.
"""
from __future__ import annotations

import heapq
from collections import Counter
from typing import Iterable

import pyarrow as pa

import schemas as S
from pipeline.store import storage
from pipeline.filter.image_stage import thumbnails_from_input
from pipeline.store.partitions import atomic_write_json, atomic_write_parquet
from pipeline.filter.report import write_report

# the ledger row of a captions row that no stage decided (a bug, or an external tool losing it)
UNACCOUNTED = {"status": S.FAILED, "stage": S.STAGE_TEXTSPOT, "reason": S.R_UNACCOUNTED,
               "error_message": "the stage returned no result for this row"}
RECONCILED = "reconciled"           # ledger/<RECONCILED>/: the rows UNACCOUNTED adds
KEPT_BUCKET = "kept"                # the report's section of kept rows (the others are named by reason)
MAX_REPORT_CAPTION = 300            # longer captions are cut in report.html (the ledger keeps them)


# ---------------------------------------------------------------- reading an output
def ledger_dirs(output: str) -> list[str]:
    """OUTPUT/ledger/<stage>/ folders, sorted: together they hold exactly one row per input row."""
    root = storage.join(output, "ledger")
    return [storage.join(root, d) for d in storage.listdir(root) if storage.isdir(storage.join(root, d))]


def read_ledger(output: str, columns: list[str] | None = None) -> pa.Table:
    return storage.read_parquet(ledger_dirs(output), columns, S.LEDGER.arrow)


# ---------------------------------------------------------------- the rules both engines share
def unaccounted_row(captions_row: dict) -> dict:
    """The failed ledger row for a captions row that has none (the evidence the captions row has)."""
    row = dict.fromkeys(S.LEDGER.columns)
    row.update({k: captions_row[k] for k in ("key", "url", "caption", "source_file", "source_row")}, **UNACCOUNTED)
    return row


def duplicate_keys_error(keys: list[str]) -> RuntimeError:
    return RuntimeError(f"ledger invariant broken: keys with several ledger rows: {keys}")


def build_stats(counts: list[dict], n_rows: int, kinds: set[str], score: bool = False, caption: bool = True) -> dict:
    """stats.json's counts from ledger counts [{stage, status, reason, count}]: totals, and per stage
    in pipeline order the rows in, passed (went on to the next stage, or kept after the last), kept
    (final status kept; of them, per reason, "kept_by_reason": {"text_masked": n} when --text-action mask
    kept some with their text masked), and dropped / failed per reason. score: the score stage ran first; caption
    False: --stages without caption (no caption rules)."""
    score = score or any(c["stage"] == S.STAGE_SCORE for c in counts)
    caption = caption or any(c["stage"] == S.STAGE_CAPTION for c in counts)
    order = ([S.STAGE_SCORE] if score else []) + ([S.STAGE_CAPTION] if caption else []) + \
        ([S.STAGE_DOWNLOAD, S.STAGE_TEXTSPOT] if kinds - {"caption"} else [])
    by_stage = {s: {"in": 0, "kept": 0, "dropped": {}, "failed": {}} for s in order}
    totals = {S.KEPT: 0, S.DROPPED: 0, S.FAILED: 0}
    for c in counts:
        st = by_stage.setdefault(c["stage"], {"in": 0, "kept": 0, "dropped": {}, "failed": {}})
        totals[c["status"]] += c["count"]
        if c["status"] == S.KEPT:
            st["kept"] += c["count"]
            if c["reason"]:   # kept, but changed (text_masked): shown among the kept, only when there are any
                kept_by = st.setdefault("kept_by_reason", {})
                kept_by[c["reason"]] = kept_by.get(c["reason"], 0) + c["count"]
        else:
            st[c["status"]][c["reason"]] = st[c["status"]].get(c["reason"], 0) + c["count"]
    remaining = sum(totals.values())
    for s in order:
        st = by_stage[s]
        st["in"] = remaining
        remaining -= st["kept"] + sum(st["dropped"].values()) + sum(st["failed"].values())
        # rows that went on to the next stage (the last stage: the kept rows); "kept" stays the rows
        # whose final status is kept, which only the last stage has
        st["passed"] = remaining + st["kept"]
    n_input = sum(totals.values())
    return {"n_input": n_input, "n_input_rows_planned": n_rows, "n_kept": totals[S.KEPT],
            "n_dropped": totals[S.DROPPED], "n_failed": totals[S.FAILED], "routes": sorted(kinds),
            "by_stage": by_stage}


def finish_stats(output: str, counts: list[dict], plan, kinds: set[str]) -> dict:
    """build_stats plus what the output folder and the plan add; written to OUTPUT/stats.json."""
    manifest_path = storage.join(output, "manifest.json")   # written before any stage ran
    manifest = storage.read_json(manifest_path) if storage.exists(manifest_path) else {}
    stages = str(manifest.get("resume_identity", {}).get("stages", "auto"))
    stats = build_stats(sorted(counts, key=_count_order), plan.n_rows, kinds, score=bool(manifest.get("score")),
                        caption=stages in ("auto", "all") or S.STAGE_CAPTION in stages.split(","))
    if manifest.get("score"):   # the score stage's thresholds (top fractions: the pool's quantiles)
        stats["score"] = manifest["score"]
    stats["bad_files"] = plan.bad_files
    stats["n_shards"] = len(storage.files(storage.join(output, "shards"), ".parquet"))
    atomic_write_json(stats, storage.join(output, "stats.json"))
    return stats


def _count_order(c: dict) -> tuple:
    return c["stage"], c["status"], c["reason"] or ""


def select_examples(rows: Iterable[dict], n: int) -> dict[str, list[dict]]:
    """The report's examples: per bucket (the reason, or "kept"), up to `n` rows - first those with a
    thumbnail ("jpg", from the image stage) in key order, then the bucket's first `n` rows by key
    (pictures for them are looked up in the input later). Buckets in name order, "kept" first.
    Any superset of each bucket's n smallest keys with and without thumbnails gives the same answer,
    so Spark may narrow the candidates down before collecting them."""
    buckets: dict[str, dict[str, dict]] = {}
    for r in rows:  # one row per key (the candidates may name a key twice: with and without its thumbnail)
        rows_of = buckets.setdefault(r["reason"] or KEPT_BUCKET, {})
        if rows_of.get(r["key"], {}).get("jpg") is None:
            rows_of[r["key"]] = r
    examples = {}
    for bucket in sorted(buckets, key=lambda b: (b != KEPT_BUCKET, b)):
        rows_of, chosen = buckets[bucket].values(), {}
        for r in heapq.nsmallest(n, [r for r in rows_of if r.get("jpg") is not None], key=lambda r: r["key"]) + \
                heapq.nsmallest(n, rows_of, key=lambda r: r["key"]):
            if len(chosen) < n and r["key"] not in chosen:
                chosen[r["key"]] = {k: r.get(k) for k in S.LEDGER.columns + ["jpg"]}
        examples[bucket] = list(chosen.values())
    return examples


def write_report_with_examples(output: str, stats: dict, candidates: Iterable[dict], n: int, columns: dict) -> None:
    """report.html with the examples select_examples picks from `candidates` (ledger rows, "jpg" =
    a thumbnail or None); rows without a thumbnail get one from the input's image column if it has one."""
    examples = select_examples(candidates, n)
    missing = [e for bucket in examples.values() for e in bucket if e["jpg"] is None]
    pictures = thumbnails_from_input(missing, columns)
    for e in missing:
        e["jpg"] = pictures.get(e["key"])
    for bucket in examples.values():
        for e in bucket:
            if e["caption"] and len(e["caption"]) > MAX_REPORT_CAPTION:
                e["caption"] = e["caption"][:MAX_REPORT_CAPTION] + " ..."
    write_report(output, stats, examples)


# ---------------------------------------------------------------- the local engine's finalisation
def finalize(output: str, plan, kinds: set[str], examples_per_reason: int) -> dict:
    """What jobs/cat_filter.py's Spark `_finalize` does, in this process with pyarrow: reconcile,
    check, count, write stats.json and report.html; returns the stats. The ledger (without images)
    is held in memory: for outputs that fit on the driver (jobs/redecide.py chooses)."""
    ledger = read_ledger(output)
    captions = storage.read_parquet(storage.join(output, "captions"),
                                    ["key", "url", "caption", "source_file", "source_row"], S.CAPTIONS.arrow)
    decided = set(ledger.column("key").to_pylist())
    missing = [unaccounted_row(r) for r in captions.to_pylist() if r["key"] not in decided]
    if missing:
        reconciled = storage.join(output, "ledger", RECONCILED)
        storage.remove_tree(reconciled)  # replaced as a whole, as Spark's overwrite does
        atomic_write_parquet(S.LEDGER.from_rows(missing), storage.join(reconciled, "part-00000.parquet"))
        ledger = read_ledger(output)
    keys = ledger.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        seen = Counter(keys)
        raise duplicate_keys_error(sorted(k for k, c in seen.items() if c > 1)[:5])
    outcomes = Counter(zip(*(ledger.column(c).to_pylist() for c in ("stage", "status", "reason"))))
    counts = [{"stage": st, "status": status, "reason": reason, "count": c}
              for (st, status, reason), c in outcomes.items()]
    stats = finish_stats(output, counts, plan, kinds)
    thumbs = {r["key"]: r["jpg"] for r in reversed(storage.read_parquet(  # the first thumbnail of a key wins
        storage.join(output, "_work", "thumbs"), ["key", "jpg"], S.THUMBS.arrow).to_pylist())}
    write_report_with_examples(output, stats, _with_thumbs(ledger, thumbs, examples_per_reason),
                               examples_per_reason, plan.columns)
    return stats


def _with_thumbs(ledger: pa.Table, thumbs: dict[str, bytes], n: int) -> list[dict]:
    """The candidates select_examples needs, without turning the whole ledger into dicts: per bucket
    the n smallest keys with a thumbnail and the n smallest keys overall."""
    keys, reasons = ledger.column("key").to_pylist(), ledger.column("reason").to_pylist()
    with_thumb, first = {}, {}
    for i, (k, reason) in enumerate(zip(keys, reasons)):
        bucket = reason or KEPT_BUCKET
        first.setdefault(bucket, []).append((k, i))
        if k in thumbs:
            with_thumb.setdefault(bucket, []).append((k, i))
    wanted = sorted({i for group in (with_thumb, first) for rows in group.values() for _, i in heapq.nsmallest(n, rows)})
    rows = ledger.take(wanted).to_pylist()
    for r in rows:
        r["jpg"] = thumbs.get(r["key"])
    return rows
