"""Caption stage of the CAT filter for one input part (one Spark task; no Spark in here).

    counts = run_caption_part(chunk, columns, out, params, final=True)

Reads the part's rows with pyarrow, assigns keys, settles what cheap checks can (null, non-string,
invalid UTF-8, empty, too long, duplicate), parses the rest with pipeline.filter.captions and applies the
DiHT rules. Writes OUTPUT/captions/<part>.parquet (every row with its parse), the ledger rows this
stage decides (OUTPUT/ledger/caption/<part>.parquet) and, when images must be fetched, the rows to
download (OUTPUT/_work/download_input/<part>.parquet); then the part's completion marker.
"""
from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

import schemas as S
from pipeline.filter import captions as cap
from pipeline.filter import score_stage
from pipeline.store import storage
from pipeline.store.keys import content_key, duplicate_key
from pipeline.store.partitions import UID_COLUMN, Chunk, Columns, atomic_write_parquet, read_chunk_salvaging, write_marker

LEDGER_CAPTION_CHARS = 1000   # the ledger is read by people; full captions stay in captions/


def part_keys(chunk: Chunk, table: pa.Table, cols: Columns, unreadable: dict) -> tuple[list[str], list[str]]:
    """(keys, content hashes) of a part's rows: the key is the given one, else the content hash;
    rows of unreadable row groups are keyed by position."""
    n = table.num_rows
    given = table.column(cols.key).to_pylist() if cols.key else [None] * n
    urls = _strings(table, cols.url) if cols.url else [None] * n
    contents = [content_key(u, c) for u, c in zip(urls, _raw_captions(table, cols.caption))]
    keys = [str(g) if g is not None else c for g, c in zip(given, contents)]
    for i in unreadable:
        keys[i] = contents[i] = unreadable_key(chunk, i)
    return keys, contents


def _read(chunk: Chunk, cols: Columns) -> tuple[pa.Table, dict[int, str]]:
    return read_chunk_salvaging(chunk, [c for c in cols.present() if c != cols.image], cols.url)


def write_part_keys(chunk: Chunk, cols: Columns, out: str) -> int:
    """Dedupe pass, step 1: every row's key and position, for the driver's duplicate query."""
    table, unreadable = _read(chunk, cols)
    keys, contents = part_keys(chunk, table, cols, unreadable)
    rows = [{"key": k, "content": c, "part": chunk.part, "row": chunk.file_row_offset + i}
            for i, (k, c) in enumerate(zip(keys, contents))]
    atomic_write_parquet(S.KEYS.from_rows(rows), storage.join(out, "_work", "keys", f"{chunk.part}.parquet"))
    return len(rows)


def unreadable_key(chunk: Chunk, i: int) -> str:
    return content_key(None, f"{storage.basename(chunk.source_file)}:{chunk.file_row_offset + i}")


def read_duplicates(out: str, part: str) -> dict[int, tuple[int, bool]]:
    """Dedupe pass result for one part: file row -> (occurrence of its key, repeats earlier content)."""
    path = storage.join(out, "_work", "dups", f"part={part}")
    if not storage.isdir(path):
        return {}
    t = storage.read_parquet(path, columns=["row", "key_occ", "content_occ"]).to_pydict()
    return {r: (k, c > 1) for r, k, c in zip(t["row"], t["key_occ"], t["content_occ"])}


def run_caption_part(chunk: Chunk, cols: Columns, out: str, params: cap.CaptionParams,
                     final: bool, download: bool = False, score_rules: list[dict] | None = None,
                     caption_rules: bool = True) -> dict:
    """score_rules (score_stage.Rule dicts): the score stage runs first, on this part's score columns;
    caption_rules False (--stages without caption): nothing is parsed, rows the score stage passes go on
    (to the image stages, or with `final` they are kept at the score stage)."""
    dups = read_duplicates(out, chunk.part)
    table, unreadable = _read(chunk, cols)  # corrupt row groups fail their rows, not the job
    n = table.num_rows
    keys, _ = part_keys(chunk, table, cols, unreadable)
    urls = _strings(table, cols.url) if cols.url else [None] * n
    texts, failures = _decode_captions(table, cols.caption)
    scored = score_stage.decide_part(chunk, [score_stage.Rule.from_dict(r) for r in score_rules or []])
    rows = []   # CAPTIONS rows
    to_parse = []
    for i in range(n):
        row = {"key": keys[i], "url": urls[i], "caption": texts[i], "source_file": chunk.source_file,
               "source_row": chunk.file_row_offset + i, "passed": False, "reason": None}
        if cols.key == UID_COLUMN:  # DataComp: the uid goes through img2dataset as its own column
            row["uid"] = keys[i]
        key_occ, repeated = dups.get(row["source_row"], (1, False))
        if i in unreadable:
            row["reason"], row["error_message"] = S.R_READ_ERROR, unreadable[i]
            rows.append(row)
            continue
        if key_occ > 1:  # the key is taken (e.g. two img2dataset runs merged): a new, traceable one
            row["key"] = duplicate_key(keys[i], key_occ)
        if i in scored:  # the score stage comes first: nothing else is looked at
            row["reason"], row["score_verdict"] = scored[i]["reason"], scored[i]
        elif not caption_rules:
            row["passed"] = True
        elif repeated:     # same url + caption as an earlier row: a re-crawl, dropped
            row["reason"] = S.R_DUPLICATE
        elif i in failures:
            row["reason"], row["caption"] = failures[i]
        elif texts[i] is None:
            row["reason"] = S.R_EMPTY_CAPTION
        elif (reason := cap.precheck_caption(texts[i], params)) is not None:
            row["reason"] = reason
        else:
            to_parse.append(i)
        rows.append(row)

    parses = cap.parse_captions([texts[i] for i in to_parse], params)
    for i, parse in zip(to_parse, parses):
        keep, reason = cap.keep_caption(parse, params.min_complexity, params.require_action)
        rows[i].update(parse.to_row(), passed=keep, reason=reason)

    ledger, download_rows = [], []
    score_ledger = []
    for r in rows:
        verdict = r.pop("score_verdict", None)
        if verdict is not None:
            score_ledger.append(_ledger_row(r, verdict["status"], S.STAGE_SCORE, verdict["reason"],
                                            **{k: v for k, v in verdict.items() if k not in ("status", "reason")}))
        elif not r["passed"]:
            status = S.FAILED if r["reason"] in (S.R_NON_STRING, S.R_INVALID_UTF8, S.R_READ_ERROR) else S.DROPPED
            ledger.append(_ledger_row(r, status, S.STAGE_CAPTION, r["reason"],
                                      error_message=r.pop("error_message", None)))
        elif not caption_rules and final:  # --stages score: kept by the score stage
            score_ledger.append(_ledger_row(r, S.KEPT, S.STAGE_SCORE, None))
        elif final:
            ledger.append(_ledger_row(r, S.KEPT, S.STAGE_CAPTION, None))
        elif download:
            if not _is_http(r["url"]):
                ledger.append(_ledger_row(r, S.FAILED, S.STAGE_DOWNLOAD, S.R_BAD_URL,
                                          error_message=f"not an http(s) URL: {str(r['url'])[:200]!r}"))
            else:
                download_rows.append({"url": r["url"], "caption": r["caption"], "uid": r.pop("uid", None),
                                      "cat_key": r["key"], "cat_part": chunk.part})

    atomic_write_parquet(S.CAPTIONS.from_rows(rows), storage.join(out, "captions", f"{chunk.part}.parquet"))
    atomic_write_parquet(S.LEDGER.from_rows(ledger),
                         storage.join(out, "ledger", S.STAGE_CAPTION, f"{chunk.part}.parquet"))
    if score_rules:  # the score stage's rows (and with --stages score its kept ones)
        atomic_write_parquet(S.LEDGER.from_rows(score_ledger),
                             storage.join(out, "ledger", S.STAGE_SCORE, f"{chunk.part}.parquet"))
    ledger = score_ledger + ledger
    if download and download_rows:  # img2dataset wants no empty input files
        atomic_write_parquet(pa.Table.from_pylist(download_rows, schema=DOWNLOAD_INPUT),
                             storage.join(out, "_work", "download_input", f"{chunk.part}.parquet"))
    counts = _count(ledger, n, sum(r["passed"] for r in rows))
    write_marker(out, S.STAGE_CAPTION, chunk.part, counts)
    return counts


# img2dataset's input for the download stage: uid (DataComp's, null for other inputs; saved as DataComp's
# download_upstream saves it), cat_key and cat_part come back in its output shards
DOWNLOAD_INPUT = pa.schema([("url", pa.string()), ("caption", pa.string()), ("uid", pa.string()),
                            ("cat_key", pa.string()), ("cat_part", pa.string())])


def ledger_row(key: str, status: str, stage: str, reason: str | None, **evidence) -> dict:
    row = dict.fromkeys(S.LEDGER.columns)
    row.update(key=key, status=status, stage=stage, reason=reason)
    row.update(evidence)
    if isinstance(row.get("caption"), str):
        row["caption"] = row["caption"][:LEDGER_CAPTION_CHARS]
    return row


def _ledger_row(r: dict, status, stage, reason, **extra) -> dict:
    evidence = {k: r.get(k) for k in ("url", "caption", "complexity", "has_action", "source_file", "source_row")}
    return ledger_row(r["key"], status, stage, reason, **evidence, **extra)


def _count(ledger: list[dict], n_rows: int, n_passed: int) -> dict:
    c = Counter((r["status"], r["stage"], r["reason"] or "") for r in ledger)
    return {"n_rows": n_rows, "n_passed": n_passed,
            "decided": [{"status": s, "stage": st, "reason": re, "n": k} for (s, st, re), k in sorted(c.items())]}


def _is_http(url) -> bool:
    return isinstance(url, str) and url.lower().startswith(("http://", "https://"))


def _strings(table: pa.Table, col: str) -> list[str | None]:
    """A column as Python strings whatever its type; invalid UTF-8 replaced (used for urls only)."""
    arr = table.column(col)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_binary(arr.type):
        return [None if b is None else b.decode("utf-8", "replace")
                for b in pc.cast(arr, pa.binary()).to_pylist()]
    return [None if v is None else str(v) for v in arr.to_pylist()]


def _raw_captions(table: pa.Table, col: str) -> list:
    """Caption values as stored: bytes for string/binary columns (not yet validated), else Python values."""
    arr = table.column(col)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or \
            pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        return pc.cast(arr, pa.large_binary()).to_pylist()
    return arr.to_pylist()


def _decode_captions(table: pa.Table, col: str) -> tuple[list[str | None], dict[int, tuple[str, str]]]:
    """Strict UTF-8 decoding; failures map row -> (reason, printable evidence)."""
    texts, failures = [], {}
    for i, v in enumerate(_raw_captions(table, col)):
        if v is None:
            texts.append(None)
        elif isinstance(v, bytes):
            try:
                texts.append(v.decode("utf-8"))
            except UnicodeDecodeError as e:
                texts.append(None)
                failures[i] = (S.R_INVALID_UTF8, f"{v[:200].decode('utf-8', 'replace')} [{e.reason} at byte {e.start}]")
        else:
            texts.append(None)
            failures[i] = (S.R_NON_STRING, f"{type(v).__name__}: {repr(v)[:200]}")
    return texts, failures
