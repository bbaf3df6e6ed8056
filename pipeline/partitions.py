"""Input planning, atomic part writes, completion markers and the resume check.

A job's input is cut into parts (runs of Parquet row groups of ~rows_per_part rows) on the driver
from the files' footers alone; each part is then one Spark task that reads its rows with pyarrow,
writes its outputs under hidden temporary names, renames them into place and finally writes a
marker. A rerun submits only the parts without a marker, so a killed job resumes without redoing
finished parts and without duplicates, and readers never see a half-written file (Spark and pyarrow
both ignore names starting with '.' or '_').
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

# columns recognised without configuration: LAION metadata (URL, TEXT) and img2dataset output
CAPTION_COLUMNS = ("TEXT", "caption", "text")
URL_COLUMNS = ("URL", "url")
KEY_COLUMNS = ("key",)
IMAGE_COLUMNS = ("jpg", "image", "webp", "png")


class InputError(ValueError):
    """The input cannot be processed as given (missing column, unreadable file, empty folder)."""


class ParamsChanged(RuntimeError):
    """Resuming into an output written with other parameters or another input."""


@dataclass(frozen=True)
class Columns:
    caption: str
    url: str | None = None
    key: str | None = None
    image: str | None = None
    status: str | None = None       # img2dataset's per-row download status, when present
    error: str | None = None        # img2dataset's error_message, when present

    def present(self) -> list[str]:
        return [c for c in (self.caption, self.url, self.key, self.image, self.status, self.error) if c]


@dataclass(frozen=True)
class Chunk:
    """One part of the input: rows [start, stop) of the listed row groups of one file."""
    part: str                        # stable name, e.g. "f00003-c0001"
    path: str
    row_groups: tuple[int, ...]
    start: int                       # offset into the concatenated row groups
    stop: int
    file_row_offset: int             # index of the first row of this chunk within its file
    tar: str | None = None           # webdataset tar holding the images (img2dataset output)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Chunk":
        return Chunk(**{**d, "row_groups": tuple(d["row_groups"])})


def list_parquet_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [os.path.abspath(path)]
    if not os.path.isdir(path):
        raise InputError(f"input {path!r} does not exist")
    files = sorted(
        f for f in glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)
        if not any(p.startswith((".", "_")) for p in os.path.relpath(f, path).split(os.sep))
    )
    if not files:
        raise InputError(f"input folder {path!r} holds no .parquet files "
                         f"(found: {sorted(os.listdir(path))[:10]})")
    return [os.path.abspath(f) for f in files]


def resolve_columns(names: list[str], path: str, caption_col: str | None = None,
                    url_col: str | None = None, key_col: str | None = None,
                    image_col: str | None = None) -> Columns:
    def pick(explicit, candidates, what, required=False):
        if explicit:
            if explicit not in names:
                raise InputError(f"{what} column {explicit!r} not found in {path}; columns found: {names}")
            return explicit
        found = next((c for c in candidates if c in names), None)
        if required and found is None:
            raise InputError(f"no {what} column in {path}: looked for {list(candidates)}; columns found: "
                             f"{names} (name it with --caption-col)")
        return found

    return Columns(
        caption=pick(caption_col, CAPTION_COLUMNS, "caption", required=True),
        url=pick(url_col, URL_COLUMNS, "url"),
        key=pick(key_col, KEY_COLUMNS, "key"),
        image=pick(image_col, IMAGE_COLUMNS, "image"),
        status="status" if "status" in names else None,
        error="error_message" if "error_message" in names else None,
    )


@dataclass
class Plan:
    chunks: list[Chunk]
    columns: dict[str, Columns]        # per file: files may differ in optional columns
    bad_files: list[dict]              # unreadable files skipped with --skip-bad-files
    fingerprint: str
    n_rows: int


def plan_input(path: str, rows_per_part: int, skip_bad_files: bool = False, **column_names) -> Plan:
    """Cut the input into parts from the Parquet footers (no data pages are read)."""
    chunks, columns, bad, finger = [], {}, [], hashlib.sha256()
    for file_idx, f in enumerate(list_parquet_files(path)):
        try:
            meta = pq.ParquetFile(f).metadata
            names = pq.ParquetFile(f).schema_arrow.names
        except Exception as e:  # noqa: BLE001 - any footer failure means the file is unreadable
            if not skip_bad_files:
                raise InputError(f"cannot read Parquet file {f}: {e} (pass --skip-bad-files to skip it "
                                 f"and record it in stats.json)") from e
            bad.append({"file": f, "error": f"{type(e).__name__}: {e}"})
            continue
        columns[f] = resolve_columns(names, f, **column_names)
        tar = f[: -len(".parquet")] + ".tar"
        tar = tar if os.path.exists(tar) and columns[f].image is None else None
        finger.update(f"{os.path.relpath(f, path) if os.path.isdir(path) else os.path.basename(f)}"
                      f"|{os.path.getsize(f)}|{meta.num_rows}|{tar is not None}\n".encode())
        chunks.extend(_chunk_file(f, meta, file_idx, rows_per_part, tar))
    if not chunks and not bad:
        raise InputError(f"input {path!r} holds no rows")
    return Plan(chunks, columns, bad, finger.hexdigest()[:16], sum(c.num_rows for c in chunks))


def _chunk_file(f, meta, file_idx, rows_per_part, tar) -> list[Chunk]:
    out, groups, acc, file_row = [], [], 0, 0

    def flush():
        nonlocal groups, acc, file_row
        if groups:
            out.append(Chunk(f"f{file_idx:05d}-c{len(out):04d}", f, tuple(groups), 0, acc, file_row, tar))
            file_row += acc
        groups, acc = [], 0

    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if n == 0:
            continue
        if n > rows_per_part:           # one huge row group: several parts slice it
            flush()
            for start in range(0, n, rows_per_part):
                stop = min(n, start + rows_per_part)
                out.append(Chunk(f"f{file_idx:05d}-c{len(out):04d}", f, (g,), start, stop, file_row, tar))
                file_row += stop - start
            continue
        if acc + n > rows_per_part:
            flush()
        groups.append(g)
        acc += n
    flush()
    return out


def read_chunk(chunk: Chunk, columns: list[str]) -> pa.Table:
    table = pq.ParquetFile(chunk.path).read_row_groups(list(chunk.row_groups), columns=columns)
    return table.slice(chunk.start, chunk.num_rows)


def read_chunk_salvaging(chunk: Chunk, columns: list[str], evidence_column: str | None = None
                         ) -> tuple[pa.Table, dict[int, str]]:
    """Read a part; when row groups are corrupt, keep the readable ones and return, aligned, null rows
    for the rest plus {row in part: error}. The evidence column (the url) is salvaged alone if it can."""
    try:
        return read_chunk(chunk, columns), {}
    except Exception:  # noqa: BLE001 - fall back to row group by row group below
        pass
    pf = pq.ParquetFile(chunk.path)
    schema = pa.schema([pf.schema_arrow.field(c) for c in columns])
    pieces, bad, offset = [], {}, 0
    for g in chunk.row_groups:
        n = pf.metadata.row_group(g).num_rows
        try:
            piece = pf.read_row_group(g, columns=columns).cast(schema)
        except Exception as e:  # noqa: BLE001 - any decoding failure of this row group
            arrays = [pa.nulls(n, f.type) for f in schema]
            if evidence_column in columns:
                try:
                    arrays[columns.index(evidence_column)] = pf.read_row_group(g, columns=[evidence_column]).column(0)
                except Exception:  # noqa: BLE001 - no evidence to salvage
                    pass
            piece = pa.Table.from_arrays(arrays, schema=schema)
            bad.update({offset + i: f"{type(e).__name__}: {e}"[:500] for i in range(n)})
        pieces.append(piece)
        offset += n
    table = pa.concat_tables(pieces).slice(chunk.start, chunk.num_rows)
    return table, {i - chunk.start: err for i, err in bad.items() if chunk.start <= i < chunk.stop}


# ---------------------------------------------------------------- atomic outputs and markers

def atomic_write_parquet(table: pa.Table, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def atomic_write_json(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def marker_path(out: str, stage: str, part: str) -> str:
    return os.path.join(out, "_done", stage, f"{part}.json")


def write_marker(out: str, stage: str, part: str, payload: dict) -> None:
    atomic_write_json(payload, marker_path(out, stage, part))


def done_parts(out: str, stage: str) -> dict[str, dict]:
    found = {}
    for f in glob.glob(os.path.join(out, "_done", stage, "*.json")):
        with open(f) as fh:
            found[os.path.basename(f)[: -len(".json")]] = json.load(fh)
    return found


def remove_stale_temporaries(out: str) -> int:
    """Temporary files of a killed run: never renamed, never read; removed before a rerun."""
    stale = glob.glob(os.path.join(out, "**", ".tmp-*"), recursive=True)
    for f in stale:
        os.remove(f)
    return len(stale)


def check_resume(out: str, resume_identity: dict) -> None:
    """Refuse to resume into an output made with other parameters or input; name the differences."""
    path = os.path.join(out, "manifest.json")
    if not os.path.exists(path):
        return
    with open(path) as fh:
        previous = json.load(fh).get("resume_identity")
    if previous is None:
        return
    now = json.loads(json.dumps(resume_identity, default=str))
    diffs = [f"{k}: {a!r} -> {b!r}" for k, a, b in _diff(previous, now)]
    if diffs:
        raise ParamsChanged(
            f"{out} was written with other parameters or input; refusing to resume. Differences: "
            + "; ".join(diffs) + ". Use a new OUTPUT, or delete the old one to start over.")


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip("."), a, b
