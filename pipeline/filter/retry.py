"""Retrying only the downloads that failed for a transient reason (no Spark in here; jobs/retry_downloads.py wires it).

    transient("HTTP Error 503: Service Unavailable")   # True: 5xx, 429, timeouts, DNS, connection errors
    n = select_part(output, "d00000", attempt_root)       # task: that shard's transient failures -> retry input
    prune_part(output, "d00000", attempt_root)           # task: the retried keys leave the old shard and ledger part

On real pools 6-30% of downloads fail; many failures are transient (a timeout, a reset connection, a
DNS hiccup, a 503) and succeed later, the rest are not (404, 403, a blocked address, bytes that are no
image). A retry attempt NNN (OUTPUT/_work/retry/NNN/):
  1. select: per downloaded shard (ledger part dXXXXX), the rows whose ledger row is a download failure
     with a transient error, with their img2dataset input (url, caption, uid, cat_key, cat_part) from the
     shard itself, into _work/retry/NNN/_work/download_input/XXXXX.parquet;
  2. img2dataset fetches them (pipeline.filter.download.run_download with that root); its shards are
     copied to OUTPUT/_work/images/rNNN-XXXXX.parquet and added to _done/download.json, so they are
     downloaded shards like the others (resume and redecide see them);
  3. the text-spot stage runs on them (parts drNNN-XXXXX), exactly as on any downloaded shard;
  4. prune: each retried key leaves its old shard (_work/images/XXXXX.parquet) and its old ledger part
     (ledger/textspot/dXXXXX.parquet); every other row stays as it was. A key lives in one shard only,
     so the output is what a run in which those downloads had succeeded writes (ledger, shards, stats,
     subset file); only the shard files are grouped differently.
Steps are idempotent and marked, so a killed retry resumes (rerun the same command).
"""
from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

import schemas as S
from pipeline.filter.caption_stage import DOWNLOAD_INPUT
from pipeline.filter.download import failure_reason
from pipeline.store import storage
from pipeline.store.partitions import atomic_write_parquet

# img2dataset records str(exception) of urllib: these are worth another try
_TRANSIENT = re.compile("|".join((
    r"HTTP Error 5\d\d", r"HTTP Error 429", r"HTTP Error 408",          # server errors, rate limits, request timeout
    r"timed out", r"timeout", r"deadline",                               # socket / read timeouts, download deadlines
    r"Name or service not known", r"Temporary failure in name resolution", r"nodename nor servname",
    r"No address associated with hostname", r"getaddrinfo failed",       # DNS
    r"Connection refused", r"Connection reset", r"Connection aborted", r"Remote end closed connection",
    r"Network is unreachable", r"No route to host", r"EOF occurred in violation of protocol",
    r"IncompleteRead", r"BrokenPipe", r"Broken pipe")), re.IGNORECASE)


def transient(error_message: str | None) -> bool:
    """Whether a download failure may succeed if tried again (5xx, 429, timeouts, DNS, connection
    errors); not a 4xx, a blocked address (never fetched on purpose) or bytes that are no image."""
    if not error_message:
        return False
    reason = failure_reason(error_message)   # the ledger's own reading of the message
    if reason in (S.R_BLOCKED_ADDRESS, S.R_TOO_LARGE):
        return False
    return reason == S.R_DOWNLOAD_TIMEOUT or bool(_TRANSIENT.search(error_message))


def attempt_root(output: str, attempt: int) -> str:
    return storage.join(output, "_work", "retry", f"{attempt:03d}")


def shard_of(part: str) -> str:
    """Ledger part dXXXXX -> its download shard OUTPUT/_work/images/XXXXX.parquet (name only)."""
    return part[1:] + ".parquet"


def retry_shard_name(attempt: int, shard: str) -> str:
    return f"r{attempt:03d}-{shard}"


def _retry_input(root: str, part: str) -> str:
    return storage.join(root, "_work", "download_input", f"{part}.parquet")


def select_part(output: str, part: str, root: str) -> int:
    """Task: the transient download failures of one downloaded shard, as retry input; their number."""
    ledger = storage.read_parquet(storage.join(output, "ledger", S.STAGE_TEXTSPOT, f"{part}.parquet"),
                                  columns=["key", "status", "stage", "reason", "error_message"], schema=S.LEDGER.arrow)
    failed = {k for k, st, sg, r, e in zip(*(ledger.column(c).to_pylist() for c in ledger.column_names))
              if st == S.FAILED and sg == S.STAGE_DOWNLOAD and r == S.R_DOWNLOAD_FAILED and transient(e)}
    path = _retry_input(root, part)
    if not failed:
        storage.remove(path)
        return 0
    shard = storage.read_parquet(storage.join(output, "_work", "images", shard_of(part)))
    rows = shard.filter(pc.is_in(shard.column("cat_key"), pa.array(sorted(failed), pa.string())))
    names = set(rows.column_names)
    table = pa.table({f.name: rows.column(f.name).cast(f.type) if f.name in names else pa.nulls(rows.num_rows, f.type)
                      for f in DOWNLOAD_INPUT}, schema=DOWNLOAD_INPUT)
    atomic_write_parquet(table, path)
    return table.num_rows


def retried_keys(root: str, part: str) -> set[str]:
    path = _retry_input(root, part)
    if not storage.exists(path):
        return set()
    return set(storage.read_parquet(path, columns=["cat_key"]).column(0).to_pylist())


def prune_part(output: str, part: str, root: str) -> int:
    """Task: the retried keys of one old shard removed from it and from its ledger part (idempotent);
    the number of rows removed from the ledger part."""
    keys = retried_keys(root, part)
    if not keys:
        return 0
    gone = pa.array(sorted(keys), pa.string())
    removed = 0
    for path, column, schema in ((storage.join(output, "_work", "images", shard_of(part)), "cat_key", None),
                                 (storage.join(output, "ledger", S.STAGE_TEXTSPOT, f"{part}.parquet"), "key",
                                  S.LEDGER.arrow)):
        table = storage.read_parquet(path, schema=schema)
        kept = table.filter(pc.invert(pc.is_in(table.column(column), gone)))
        if kept.num_rows != table.num_rows:
            atomic_write_parquet(kept, path)
            if column == "key":
                removed = table.num_rows - kept.num_rows
    return removed
