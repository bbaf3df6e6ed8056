"""Input planning, atomic part writes, completion markers and the resume check.

    plan = plan_input("laion/*.csv.gz", 20_000, work_dir=OUTPUT)   # file, folder or glob

Inputs are Parquet (LAION metadata, img2dataset output) or img2dataset's other URL-list formats
(CSV, TSV, JSON, JSON lines, optionally gzipped), which are converted once to Parquet in the
output's work area. A job's input is cut into parts (runs of Parquet row groups of ~rows_per_part rows) on the driver
from the files' footers alone; each part is then one Spark task that reads its rows with pyarrow,
writes its outputs under hidden temporary names, renames them into place and finally writes a
marker. A rerun submits only the parts without a marker, so a killed job resumes without redoing
finished parts and without duplicates, and readers never see a half-written file (Spark and pyarrow
both ignore names starting with '.' or '_').
"""
from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store import storage
from pipeline.store.storage import STORAGE_ERRNOS, StorageError, storage_error, writing  # noqa: F401 (re-exported)

# columns recognised without configuration: LAION metadata (URL, TEXT), img2dataset output and DataComp's
# CommonPool metadata (uid, url, text; its img2dataset shards carry uid beside img2dataset's own key):
# a uid, where present, is the key, so the ledger and the subset file speak DataComp's ids
CAPTION_COLUMNS = ("TEXT", "caption", "text")
URL_COLUMNS = ("URL", "url")
KEY_COLUMNS = ("uid", "key")
UID_COLUMN = "uid"
IMAGE_COLUMNS = ("jpg", "image", "webp", "png")

# img2dataset's input formats that carry captions (txt has URLs only); any may end in .gz
INPUT_FORMATS = ("parquet", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz", "jsonl", "jsonl.gz")
EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".json": "json"}
FORMAT_NAMES = {"parquet": "Parquet", "csv": "CSV", "tsv": "TSV", "json": "JSON", "jsonl": "JSON lines"}


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
    source: str | None = None        # the CSV / JSON file `path` was converted from, if any

    @property
    def source_file(self) -> str:
        return self.source or self.path

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Chunk":
        return Chunk(**{**d, "row_groups": tuple(d["row_groups"])})


def list_parquet_files(path: str) -> list[str]:
    """Parquet files of a file, folder or glob (img2dataset output, filter shards)."""
    return [f for f, _ in list_input_files(path, "parquet")]


def format_of(path: str, input_format: str = "auto") -> str | None:
    """'parquet' | 'csv' | 'tsv' | 'json' | 'jsonl' (a .gz suffix is read transparently)."""
    if input_format != "auto":
        return input_format.removesuffix(".gz")
    name = path.lower().removesuffix(".gz")
    return next((fmt for ext, fmt in EXTENSIONS.items() if name.endswith(ext)), None)


def list_input_files(path: str, input_format: str = "auto") -> list[tuple[str, str]]:
    """(file, format) of the input: a file, a folder (searched recursively) or a glob. A folder in
    auto mode gives its Parquet files when it has any (img2dataset output keeps *_stats.json beside
    them), else its CSV / TSV / JSON / JSONL files. Names starting with '.' or '_' are skipped."""
    if input_format not in ("auto", *INPUT_FORMATS):
        raise InputError(f"unknown input format {input_format!r}; use one of {', '.join(INPUT_FORMATS)}")
    if storage.is_remote(path):
        storage.check_access(path)  # a missing bucket or denied credentials: one clear line, before any work
    if storage.has_magic(path):
        matches = storage.glob(storage.normalize(path))
        if not matches:
            raise InputError(f"no file matches the pattern {path!r}")
    elif storage.exists(path):
        matches = [storage.normalize(path)]
    else:
        raise InputError(f"input {path!r} does not exist")
    found = []
    for m in matches:
        if storage.isfile(m):
            fmt = format_of(m, input_format)
            if fmt is None and not glob.has_magic(path):
                hint = " (plain URL lists hold no captions, which the CAT filter needs)" if m.endswith(
                    (".txt", ".txt.gz")) else ""
                raise InputError(f"cannot tell the format of {m} from its name{hint}; name it *.parquet, *.csv, "
                                 f"*.tsv, *.json or *.jsonl (optionally .gz), or pass --input-format")
            if fmt is not None:
                found.append((storage.normalize(m), fmt))
        elif storage.isdir(m):
            found.extend(_folder_files(m, input_format))
    if not found:
        is_folder = not storage.has_magic(path) and storage.isdir(path)
        where = f"folder {path!r}" if is_folder else f"pattern {path!r}"
        listing = f" (found: {storage.listdir(storage.normalize(path))[:10]})" if is_folder else ""
        raise InputError(f"input {where} holds no .parquet, .csv, .tsv, .json or .jsonl files{listing}")
    return found


def _folder_files(folder: str, input_format: str) -> list[tuple[str, str]]:
    folder = storage.normalize(folder)
    files = [f for f in storage.glob(storage.join(folder, "**"))
             if not any(p.startswith((".", "_")) for p in _relative(f, folder).split("/"))
             and format_of(f) is not None and storage.isfile(f)]
    typed = [(f, format_of(f)) for f in files]
    if input_format != "auto":
        wanted = input_format.removesuffix(".gz")
        return [(f, fmt) for f, fmt in typed if fmt == wanted]
    parquet = [(f, fmt) for f, fmt in typed if fmt == "parquet"]
    return parquet or typed


def input_base(path: str) -> str:
    """The folder file names are taken relative to in the fingerprint: the input folder, or a
    glob's fixed prefix."""
    path = storage.normalize(path)
    if storage.has_magic(path):
        fixed = []
        for p in path.split("/"):
            if storage.has_magic(p):
                break
            fixed.append(p)
        return "/".join(fixed) or "."
    return path if storage.isdir(path) else storage.dirname(path) or "."


def input_locations(path: str) -> list[str]:
    """Where an input lives, for the check that no output overlaps it: the file or folder itself;
    for a glob its matches, plus its fixed prefix when the pattern descends into sub-folders."""
    if not storage.has_magic(path):
        return [storage.normalize(path)]
    pattern = storage.normalize(path)
    base = input_base(pattern)
    rest = pattern[len(base):].strip("/")
    out = storage.glob(pattern)
    if "**" in rest or "/" in rest:
        out.append(base)
    return out


def check_apart(inputs: dict[str, str | list[str]], outputs: dict[str, str]) -> None:
    """Refuse (InputError, naming both) an output that is, lies inside or contains an input: the run
    would read its own outputs back as input and write into the input's folder. Symlinks and '..'
    are resolved; on stores the same bucket and prefix count."""
    import fnmatch
    for out_name, out in outputs.items():
        if not out:
            continue
        for in_name, given in inputs.items():
            for where in [given] if isinstance(given, str) else given:
                if not where:
                    continue
                matched = storage.has_magic(where) and fnmatch.fnmatch(storage.normalize(out), storage.normalize(where))
                for loc in input_locations(where) if storage.has_magic(where) else [where]:
                    how = storage.overlaps(out, loc)
                    if how or matched:
                        how = how or "matches"
                        raise InputError(f"{out_name} {out} {how} {in_name} {loc if how != 'matches' else where}: "
                                         f"outputs must lie apart from inputs (the run would read its own outputs "
                                         f"back or write into the input); choose another {out_name}")


def _relative(f: str, base: str) -> str:
    """f's name under base ('/'-separated), for fingerprints that survive moving the whole input."""
    base = base.rstrip("/") + "/"
    return f[len(base):] if f.startswith(base) else os.path.relpath(f, base) if not storage.is_remote(f) else f


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
    columns: dict[str, Columns]        # per readable Parquet file: files may differ in optional columns
    bad_files: list[dict]              # unreadable files skipped with --skip-bad-files
    fingerprint: str
    n_rows: int
    content: dict[str, str] = None     # per input file (name relative to the input): its content tag


HEAD_TAIL_BYTES = 1 << 16   # a Parquet file's content tag hashes its first and last 64 KiB (the footer's end)


def content_tag(f: str, fmt: str) -> str:
    """What changes when a file's content changes, cheaply. Stores: size and the store's ETag / MD5 /
    generation. Local text inputs (CSV, TSV, JSON): a hash of the whole file (it is read whole to convert
    anyway). Local Parquet: size, mtime and hashes of the first and last 64 KiB (the footer, which holds
    every row group's offsets and statistics, is read for planning anyway): two small reads per file, not
    a pass over image bytes; an image replaced in place by one of the same length with the mtime restored
    is caught when its row is copied (the stored image digest, pipeline.filter.image_stage)."""
    if storage.is_remote(f):
        return f"size {storage.size(f)}|version {storage.version_tag(f)}"
    h = hashlib.blake2b(digest_size=16)
    st = os.stat(f)
    with open(f, "rb") as fh:
        if fmt != "parquet" or st.st_size <= 2 * HEAD_TAIL_BYTES:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
            what = "blake2b"
        else:
            h.update(fh.read(HEAD_TAIL_BYTES))
            fh.seek(st.st_size - HEAD_TAIL_BYTES)
            h.update(fh.read(HEAD_TAIL_BYTES))
            what = "head+tail blake2b"
    mtime = f"|mtime_ns {st.st_mtime_ns}" if fmt == "parquet" and st.st_size > 2 * HEAD_TAIL_BYTES else ""
    return f"size {st.st_size}{mtime}|{what} {h.hexdigest()}"


def plan_input(path: str, rows_per_part: int, skip_bad_files: bool = False, work_dir: str | None = None,
               input_format: str = "auto", **column_names) -> Plan:
    """Cut the input into parts from Parquet footers (no data pages are read). CSV / TSV / JSON(L)
    files are first converted once, streaming, to Parquet under work_dir/_work/input/ (reused by a
    rerun while the source is unchanged), so parts, resume and the ledger work as for Parquet."""
    chunks, columns, bad, finger, content = [], {}, [], hashlib.sha256(), {}
    base = input_base(path)
    for file_idx, (f, fmt) in enumerate(list_input_files(path, input_format)):
        try:
            tag = content[_relative(f, base)] = content_tag(f, fmt)
            if fmt == "parquet":
                readable, cols = f, None
            else:
                if work_dir is None:
                    raise InputError(f"{f}: {FORMAT_NAMES[fmt]} input needs a work folder to convert it in")
                readable, cols = convert_to_parquet(f, fmt, work_dir, file_idx, rows_per_part, column_names, tag)
            pf = storage.parquet_file(readable)
            meta, names = pf.metadata, pf.schema_arrow.names
        except (InputError, StorageError):
            raise
        except Exception as e:  # noqa: BLE001 - any read failure means the file is unreadable
            error = f"cannot read {f} as {FORMAT_NAMES[fmt]}: {type(e).__name__}: {e}"
            if not skip_bad_files:
                raise InputError(f"{error} (pass --skip-bad-files to skip it and record it in stats.json)") from e
            bad.append({"file": f, "format": fmt, "error": f"{type(e).__name__}: {e}"[:1000]})
            continue
        columns[readable] = cols or resolve_columns(names, f, **column_names)
        tar = f[: -len(".parquet")] + ".tar" if fmt == "parquet" else ""
        tar = tar if tar and storage.exists(tar) and columns[readable].image is None else None
        finger.update(f"{_relative(f, base)}|{storage.size(f)}|{meta.num_rows}|{tar is not None}\n".encode())
        chunks.extend(_chunk_file(readable, meta, file_idx, rows_per_part, tar, None if fmt == "parquet" else f))
    if not chunks:
        if bad:
            listed = "; ".join(f"{storage.basename(b['file'])}: {b['error'][:120]}" for b in bad[:3])
            raise InputError(f"nothing readable in {path!r}: all {len(bad)} input file(s) failed to read "
                             f"({listed}{'; ...' if len(bad) > 3 else ''}){' and the others hold no rows' if columns else ''}")
        raise InputError(f"input {path!r} holds no rows")
    return Plan(chunks, columns, bad, finger.hexdigest()[:16], sum(c.num_rows for c in chunks), content)


def input_content(path: str, input_format: str = "auto") -> dict[str, str]:
    """{file relative to the input: content_tag} of an input, as plan_input records it, without converting
    or reading any rows (checked before anything is written from the input)."""
    base = input_base(path)
    return {_relative(f, base): content_tag(f, fmt) for f, fmt in list_input_files(path, input_format)}


def changed_files(recorded: dict | None, now: dict) -> list[str]:
    """Input files (relative names) whose content tag differs from the recorded one, or that appeared or
    went; [] when nothing was recorded (outputs of earlier versions)."""
    if not recorded:
        return []
    return sorted(n for n in set(recorded) | set(now) if recorded.get(n) != now.get(n))


# ---------------------------------------------------------------- CSV / TSV / JSON(L) -> Parquet

def convert_to_parquet(src: str, fmt: str, work_dir: str, file_idx: int, rows_per_part: int,
                       column_names: dict, tag: str | None = None) -> tuple[str, Columns]:
    """Stream a URL list into OUTPUT/_work/input/<n>-<name>.parquet with the columns the filter uses.
    Caption and url are stored as bytes so a bad byte sequence fails its row (caption_invalid_utf8),
    not the file."""
    src_size = storage.size(src)
    group = max(1, min(rows_per_part, 65_536))
    # the source's content (content_tag: a hash of the whole text file), not its mtime: a same-length edit
    # with the mtime put back must not serve the old rows
    stamp = json.dumps({"size": src_size, "content": tag or content_tag(src, fmt), "format": fmt, "row_group": group,
                        "columns": {k: v for k, v in sorted(column_names.items()) if v}})
    dst = storage.join(work_dir, "_work", "input", f"{file_idx:05d}-{storage.basename(src)}.parquet")
    if storage.exists(dst):
        meta = storage.parquet_file(dst).schema_arrow.metadata or {}
        if meta.get(b"catcurate_source") == stamp.encode():
            return dst, Columns(**json.loads(meta[b"catcurate_columns"]))
    block = CSV_BLOCK_BYTES
    while True:
        try:
            return _convert(src, fmt, dst, group, stamp, src_size, column_names, block)
        except pa.ArrowInvalid as e:
            # a row longer than the reader's block (a caption of megabytes): read again with a larger block
            if "straddl" not in str(e) or fmt not in ("csv", "tsv") or block >= CSV_MAX_BLOCK_BYTES:
                raise
            block = min(CSV_MAX_BLOCK_BYTES, block * 4)


# CSV / TSV are read in blocks of CSV_BLOCK_BYTES; a file with a longer row is read again with 4x larger
# blocks, up to CSV_MAX_BLOCK_BYTES (a row longer than that fails the file: --skip-bad-files skips it)
CSV_BLOCK_BYTES = 1 << 22
CSV_MAX_BLOCK_BYTES = 1 << 28


def _convert(src: str, fmt: str, dst: str, group: int, stamp: str, src_size: int, column_names: dict,
             block: int) -> tuple[str, Columns]:
    batches = _csv_batches(src, fmt, group, block) if fmt in ("csv", "tsv") else _json_batches(src, group)
    names = next(batches)
    cols = replace(resolve_columns(names, src, **column_names), image=None)  # no image bytes in text formats
    schema = _typed_table({}, cols).schema.with_metadata(
        {"catcurate_source": stamp, "catcurate_columns": json.dumps(asdict(cols))})
    if storage.is_remote(dst):  # streamed as a multipart upload: the object appears only when complete
        with storage.open(dst, "wb") as fh, pq.ParquetWriter(fh, schema, compression="zstd") as writer:
            _write_converted(writer, batches, cols, schema, group)
        return dst, cols
    with storage.local_commit(dst, src_size) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        _write_converted(writer, batches, cols, schema, group)
    return dst, cols


def _write_converted(writer, batches, cols: Columns, schema: pa.Schema, group: int) -> None:
    for records in batches:  # a header-only file gives an empty Parquet file with the right columns
        writer.write_table(_typed_table(records, cols).replace_schema_metadata(schema.metadata),
                           row_group_size=group)


def _typed_table(records: dict[str, list], cols: Columns) -> pa.Table:
    """One fixed schema for every batch: caption and url as bytes (checked per row downstream),
    other columns as text; a JSON value that is not a string is stored as its JSON text."""
    def text(v):
        if v is None or isinstance(v, str):
            return v
        return json.dumps(v)

    arrays = {}
    for name in cols.present():
        values = [text(v) for v in records.get(name, [])]
        if name in (cols.caption, cols.url):
            arrays[name] = pa.array([None if v is None else v.encode("utf-8", "surrogateescape") for v in values],
                                    pa.binary())
        else:
            arrays[name] = pa.array([None if v is None else v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                                     for v in values], pa.string())
    return pa.table(arrays)


def _csv_batches(src: str, fmt: str, rows: int, block: int = CSV_BLOCK_BYTES):
    """Yields the header names, then {column: values} batches; every column read as text."""
    import csv

    import pyarrow.csv as pacsv
    delimiter = "\t" if fmt == "tsv" else ","
    with _input_stream(src) as stream:
        first = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="").readline()
    if not first.strip():
        raise InputError(f"{src} is empty: a {FORMAT_NAMES[fmt]} URL list needs a header line")
    names = next(csv.reader([first], delimiter=delimiter))
    yield names
    reader = pacsv.open_csv(_input_stream(src),
                            read_options=pacsv.ReadOptions(block_size=block),
                            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                            convert_options=pacsv.ConvertOptions(column_types={n: pa.binary() for n in names},
                                                                 strings_can_be_null=False))
    for batch in reader:
        records = {n: batch.column(n).to_pylist() for n in batch.schema.names}
        for n in records:  # text columns back to str, bad bytes kept for the caption check
            records[n] = [v.decode("utf-8", "surrogateescape") if v is not None else None for v in records[n]]
        for i in range(0, batch.num_rows, rows):
            yield {n: v[i:i + rows] for n, v in records.items()}


def _json_batches(src: str, rows: int):
    """A JSON array of records (read whole, as img2dataset does) or JSON lines (streamed)."""
    with _input_stream(src) as stream:
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape")
        head = text.read(1)
        while head.isspace():
            head = text.read(1)
        if head == "[":
            records = json.loads(head + text.read())
            lines = None
        else:
            records, lines = None, _json_lines(head, text, src)
            first = list(itertools.islice(lines, rows))
            records = first
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("expected JSON objects, one per line, or an array of objects")
        names = list(dict.fromkeys(k for r in records[:1000] for k in r))
        yield names
        while records:
            for i in range(0, len(records), rows):
                piece = records[i:i + rows]
                yield {n: [r.get(n) for r in piece] for n in names}
            records = list(itertools.islice(lines, rows)) if lines is not None else []


def _input_stream(src: str):
    """A local or remote text file, gzip detected from the name, as a pyarrow input stream."""
    if not storage.is_remote(src):
        return pa.input_stream(src, compression="detect")
    return pa.input_stream(storage.open(src, "rb"), compression="gzip" if src.endswith(".gz") else None)


def _json_lines(head: str, text, src: str):
    for n, line in enumerate(itertools.chain([head + text.readline()], text), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"line {n}: {e}") from None
            if not isinstance(record, dict):
                raise ValueError(f"line {n}: expected a JSON object")
            yield record


def _chunk_file(f, meta, file_idx, rows_per_part, tar, source) -> list[Chunk]:
    out, groups, acc, file_row = [], [], 0, 0

    def flush():
        nonlocal groups, acc, file_row
        if groups:
            out.append(Chunk(f"f{file_idx:05d}-c{len(out):04d}", f, tuple(groups), 0, acc, file_row, tar, source))
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
                out.append(Chunk(f"f{file_idx:05d}-c{len(out):04d}", f, (g,), start, stop, file_row, tar, source))
                file_row += stop - start
            continue
        if acc + n > rows_per_part:
            flush()
        groups.append(g)
        acc += n
    flush()
    return out


def read_chunk(chunk: Chunk, columns: list[str]) -> pa.Table:
    table = storage.parquet_file(chunk.path).read_row_groups(list(chunk.row_groups), columns=columns)
    return table.slice(chunk.start, chunk.num_rows)


def read_chunk_salvaging(chunk: Chunk, columns: list[str], evidence_column: str | None = None
                         ) -> tuple[pa.Table, dict[int, str]]:
    """Read a part; when row groups are corrupt, keep the readable ones and return, aligned, null rows
    for the rest plus {row in part: error}. The evidence column (the url) is salvaged alone if it can."""
    try:
        return read_chunk(chunk, columns), {}
    except Exception:  # noqa: BLE001 - fall back to row group by row group below
        pass
    pf = storage.parquet_file(chunk.path)
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

def as_storage_error(exc: BaseException, folder: str) -> StorageError | None:
    """The one-line StorageError behind a job failure, or None when the failure is something else.
    Errors from Spark tasks arrive as text (the Python traceback inside a Java exception)."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return storage_error(getattr(exc, "filename", None) or storage.join(folder, "?"), exc)
    text = str(exc)
    found = re.search(r"StorageError: \[Errno (\d+)\] ([^\n]*)", text)
    if found:
        return StorageError(int(found.group(1)), found.group(2))
    for code, words in STORAGE_ERRNOS.items():
        if words in text.lower() or f"[errno {code}]" in text.lower():
            return storage_error(storage.join(folder, "..."), OSError(code, words))
    return None


def task_error(exc: BaseException, names: tuple[str, ...]) -> str | None:
    """The one-line message of an error of one of the classes `names` raised in a Spark task, which
    reaches the driver as text (the Python traceback inside a Java exception); None when it is not one."""
    found = re.search(rf"\b({'|'.join(map(re.escape, names))}): ([^\n]*)", str(exc))
    return found.group(2).strip() if found else None


def atomic_write_parquet(table: pa.Table, path: str) -> None:
    """Readers see the whole file or nothing: local temporary + rename, or one PUT (storage.py)."""
    storage.write_parquet(table, path)


def atomic_write_json(obj, path: str) -> None:
    storage.write_json(path, obj)


def marker_path(out: str, stage: str, part: str) -> str:
    return storage.join(out, "_done", stage, f"{part}.json")


def write_marker(out: str, stage: str, part: str, payload: dict) -> None:
    atomic_write_json(payload, marker_path(out, stage, part))


def done_parts(out: str, stage: str) -> dict[str, dict]:
    """{part: marker payload} of the finished parts: the only parts readers and resume trust."""
    markers = storage.files(storage.join(out, "_done", stage), ".json")
    return {storage.basename(f)[: -len(".json")]: json.loads(b) for f, b in storage.read_many(markers).items()}


def remove_stale_temporaries(out: str) -> int:
    """Temporary files of a killed run: never renamed, never read; removed before a rerun. Object
    stores have none (objects are written once under their final names)."""
    if storage.is_remote(out):
        return 0
    stale = glob.glob(os.path.join(out, "**", ".tmp-*"), recursive=True)
    for f in stale:
        os.remove(f)
    return len(stale)


def check_resume(out: str, resume_identity: dict) -> None:
    """Refuse to resume into an output made with other parameters or input; name the differences."""
    path = storage.join(out, "manifest.json")
    if not storage.exists(path):
        return
    previous = read_manifest(path).get("resume_identity")
    if previous is None:
        return
    now = json.loads(json.dumps(resume_identity, default=str))
    if isinstance(previous.get("input"), dict) and "content" not in previous["input"]:
        now.get("input", {}).pop("content", None)   # written before content tags were recorded
    changed = changed_files((previous.get("input") or {}).get("content"), (now.get("input") or {}).get("content") or {})
    if changed:
        raise ParamsChanged(
            f"input file(s) changed since {out} was written: {', '.join(changed[:5])}"
            f"{' and more' if len(changed) > 5 else ''}; refusing to resume (its finished parts were decided on "
            f"the old content). Filter just the changed file(s) into a new OUTPUT, or delete {out} to start over.")
    diffs = [f"{k}: {a!r} -> {b!r}" for k, a, b in dict_differences(previous, now)]
    if diffs:
        raise ParamsChanged(
            f"{out} was written with other parameters or input; refusing to resume. Differences: "
            + "; ".join(diffs) + ". Use a new OUTPUT, or delete the old one to start over.")


def read_manifest(path: str) -> dict:
    """A manifest.json this product wrote, or InputError in one line when it is not one (garbage, edited
    into something else than a JSON object)."""
    try:
        doc = json.loads(storage.read_bytes(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a manifest this product wrote (not JSON: {e}); restore it, or use a new "
                         f"folder") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("resume_identity", {}), dict):
        raise InputError(f"{path} is not a manifest this product wrote (no resume identity object); restore it, or "
                         f"use a new folder")
    return doc


def dict_differences(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from dict_differences(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip("."), a, b
