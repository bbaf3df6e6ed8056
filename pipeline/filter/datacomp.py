"""DataComp's filtering-track subset file from a filter output whose keys are uids (no Spark in here).

    .venv/bin/catcurate datacomp-subset out/filter      # OUTPUT/datacomp/subset_uids.npy for a finished output
    write_subset(output, n_kept, map_fn)               # what the filter and redecide call (map_fn: Spark tasks)

A filtering-track submission is the list of kept uids: a NumPy array of dtype np.dtype("u8,u8"), each
32-hex-character uid as (int(uid[:16], 16), int(uid[16:32], 16)), sorted - exactly what DataComp's
resharder (`resharder.py -s subset_uids.npy`) and `evaluate.py --track=filtering` read and look
uids up in with np.searchsorted. An output's keys are uids when every input file's key column is
`uid` (CommonPool metadata, or DataComp's img2dataset shards, which carry it).

Written from the ledger's kept rows without collecting them anywhere: an external sort by ranges of
the uid space. (1) scatter, one task per ledger file: its kept uids, split by their top `bits` bits
into bucket runs (_work/datacomp/runs/bNNNNN/<file>.npy); (2) one task per bucket: its runs loaded,
sorted and de-duplicated (a uid kept under a renamed duplicate key `uid~2` counts once);
(3) the driver streams the sorted buckets, in bucket order, after one .npy header into the file -
a byte copy, never holding more than one block. Buckets hold ~BUCKET_BYTES each (uids are hashes,
spread evenly), 2**bits of them. The count goes to stats.json (n_subset_uids).

Pairs kept with their text masked (--text-action mask, reason text_masked) are left out by default: a uid
names the pool's original image, so DataComp's resharder would fetch the unmasked photo - the very text
the filter found - and a uid list cannot carry a mask. They are counted (n_masked_not_in_subset) and
named in a warning; to train on the masked images, use OUTPUT/shards (DataComp's BYOD track), or pass
--include-masked to list their uids anyway (the originals, unmasked).
"""
from __future__ import annotations

import argparse
import functools
import io
import os
import re
import sys

import numpy as np
import pyarrow.compute as pc

import schemas as S
from pipeline.store import storage
from pipeline.store.partitions import UID_COLUMN

SUBSET_DTYPE = np.dtype("u8,u8")
SUBSET_PATH = ("datacomp", "subset_uids.npy")
WORK = ("_work", "datacomp")
BUCKET_BYTES = 256 << 20        # a bucket's sorted uids in one task's memory
MAX_BUCKET_BITS = 16
COPY_BLOCK = 1 << 22            # uids per write when concatenating
_UID = re.compile(r"[0-9a-fA-F]{32}")


def subset_path(output: str) -> str:
    return storage.join(output, *SUBSET_PATH)


def uid_pair(uid: str) -> tuple[int, int]:
    """DataComp's split of a uid into two unsigned 64-bit integers."""
    return int(uid[:16], 16), int(uid[16:32], 16)


def uids_to_array(uids) -> np.ndarray:
    """uids -> sorted, unique array of SUBSET_DTYPE (for small sets and checks)."""
    return np.unique(np.array([uid_pair(u) for u in uids], dtype=SUBSET_DTYPE))


def uid_keyed(columns: dict) -> bool:
    """Whether every input file's key column is the uid ({file: Columns or its dict})."""
    keys = [c["key"] if isinstance(c, dict) else c.key for c in columns.values()]
    return bool(keys) and all(k == UID_COLUMN for k in keys)


def bucket_bits(n_kept: int) -> int:
    bits = 0
    while bits < MAX_BUCKET_BITS and (n_kept * SUBSET_DTYPE.itemsize >> bits) > BUCKET_BYTES:
        bits += 1
    return bits


def _kept_uids(ledger_file: str, include_masked: bool = False) -> tuple[np.ndarray, int, int]:
    """The kept uids of one ledger file (duplicate suffixes `~n` removed); how many kept keys are no uid;
    and how many kept-with-text-masked rows were left out (none with include_masked)."""
    t = storage.read_parquet(ledger_file, columns=["key", "status", "reason"])
    kept = t.filter(pc.equal(t.column("status"), S.KEPT))
    masked = pc.fill_null(pc.equal(kept.column("reason"), S.R_TEXT_MASKED), False)
    n_masked = 0 if include_masked else pc.sum(masked).as_py() or 0
    keys = (kept if include_masked else kept.filter(pc.invert(masked))).column("key").to_pylist()
    pairs, invalid = [], 0
    for k in keys:
        uid = k.split("~", 1)[0]
        if _UID.fullmatch(uid):
            pairs.append(uid_pair(uid))
        else:
            invalid += 1
    return np.array(pairs, dtype=SUBSET_DTYPE), invalid, n_masked


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _load(path: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)


def scatter(output: str, bits: int, include_masked: bool, item: tuple[str, str]) -> tuple[int, int]:
    """Task: one ledger file's kept uids into bucket runs; returns (kept keys that are no uid, masked left out)."""
    name, ledger_file = item
    arr, invalid, n_masked = _kept_uids(ledger_file, include_masked)
    if len(arr):
        bucket = (arr["f0"] >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(len(arr), np.int64)
        for b in np.unique(bucket):
            storage.write_bytes(storage.join(output, *WORK, "runs", f"b{int(b):05d}", f"{name}.npy"),
                                _npy_bytes(arr[bucket == b]))
    return invalid, n_masked


def sort_bucket(output: str, bucket: str) -> int:
    """Task: one bucket's runs sorted and de-duplicated into _work/datacomp/sorted/<bucket>.npy; its length."""
    runs = [_load(f) for f in storage.files(storage.join(output, *WORK, "runs", bucket), ".npy")]
    arr = np.unique(np.concatenate(runs)) if runs else np.empty(0, SUBSET_DTYPE)  # sorts field by field
    storage.write_bytes(storage.join(output, *WORK, "sorted", f"{bucket}.npy"), _npy_bytes(arr))
    return len(arr)


def _concatenate(output: str, buckets: list[str], lengths: list[int]) -> int:
    """The sorted buckets, in order, streamed after one header into OUTPUT/datacomp/subset_uids.npy."""
    n = int(sum(lengths))
    path = subset_path(output)

    def write(fh):
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(SUBSET_DTYPE),
                                                  "fortran_order": False, "shape": (n,)})
        for b in buckets:
            arr = _load(storage.join(output, *WORK, "sorted", f"{b}.npy"))
            for i in range(0, len(arr), COPY_BLOCK):
                fh.write(arr[i:i + COPY_BLOCK].tobytes())

    if storage.is_remote(path):
        with storage.open(path, "wb") as fh:   # one multipart upload: the object appears when complete
            write(fh)
    else:
        with storage.local_commit(path, n * SUBSET_DTYPE.itemsize + 128) as tmp, open(tmp, "wb") as fh:
            write(fh)
    return n


def _local_map(fn, items):
    return [fn(x) for x in items]


def write_subset(output: str, n_kept: int, map_fn=None, bits: int | None = None, include_masked: bool = False) -> dict:
    """OUTPUT/datacomp/subset_uids.npy from OUTPUT's ledger; returns {n_subset_uids, ...} for stats.json.
    map_fn(fn, items) runs fn over items (a list of results back): in this process by default, as
    Spark tasks when the job passes one (only per-task counts come back). Kept-with-text-masked rows are
    left out unless include_masked (see the module's docstring)."""
    from pipeline.filter.finalize import ledger_dirs
    map_fn = map_fn or _local_map
    bits = bucket_bits(n_kept) if bits is None else bits
    work = storage.join(output, *WORK)
    storage.remove_tree(work)
    files = [(f"{storage.basename(d)}-{storage.basename(f)[: -len('.parquet')]}", f)
             for d in ledger_dirs(output) for f in storage.files(d, ".parquet")]
    counts = map_fn(functools.partial(scatter, output, bits, include_masked), files) if files else []
    invalid, n_masked = sum(c[0] for c in counts), sum(c[1] for c in counts)
    runs = storage.join(work, "runs")
    buckets = sorted(d for d in (storage.listdir(runs) if storage.isdir(runs) else [])
                     if storage.isdir(storage.join(runs, d)))
    lengths = map_fn(functools.partial(sort_bucket, output), buckets) if buckets else []
    n = _concatenate(output, buckets, lengths)
    storage.remove_tree(work)
    if invalid:
        print(f"[datacomp] WARNING: {invalid} kept keys are not 32-hex-character uids and are not in the subset file",
              flush=True)
    if n_masked:
        print(f"[datacomp] WARNING: {n_masked} pairs kept with their text masked are not in the subset file: a uid "
              "would fetch the unmasked original; train on OUTPUT/shards to use them (datacomp-subset "
              "--include-masked lists the originals anyway)", flush=True)
    return {"n_subset_uids": n, "datacomp": {"subset_file": "/".join(SUBSET_PATH), "dtype": "u8,u8",
                                             "n_uids": n, "n_kept_keys_not_uids": invalid,
                                             "n_masked_not_in_subset": n_masked, "include_masked": include_masked,
                                             "bucket_bits": bits}}


def read_subset(path: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="catcurate datacomp-subset", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", help="a finished filter (or redecide) output whose keys are uids")
    ap.add_argument("--bucket-bits", type=int, default=None, help="2**bits sort buckets (default: from the count)")
    ap.add_argument("--include-masked", action="store_true",
                    help="also list pairs kept with their text masked (their uids fetch the unmasked originals)")
    a = ap.parse_args(argv)
    output = storage.normalize(a.output)
    stats_path, manifest_path = storage.join(output, "stats.json"), storage.join(output, "manifest.json")
    if not storage.isfile(stats_path) or not storage.isfile(manifest_path):
        print(f"datacomp: error: {a.output} has no stats.json / manifest.json: not a finished filter OUTPUT",
              file=sys.stderr)
        return 2
    manifest, stats = storage.read_json(manifest_path), storage.read_json(stats_path)
    if not uid_keyed(manifest.get("columns", {})):
        print(f"datacomp: error: {a.output}'s keys are not DataComp uids (its input has no `uid` column)",
              file=sys.stderr)
        return 2
    info = write_subset(output, stats.get("n_kept", 0), bits=a.bucket_bits, include_masked=a.include_masked)
    stats.update(info)
    storage.write_json(stats_path, stats)
    print(f"{info['n_subset_uids']:,} uids -> {subset_path(output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
