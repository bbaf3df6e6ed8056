"""Paths and URIs: the one place that turns a location into I/O, on local disks and object stores.

    from pipeline.store import storage as fs
    fs.write_parquet(table, fs.join("s3://bucket/out", "shards", "00000.parquet"))
    fs.listdir("gs://bucket/out/_done/caption")          # names, never a stale listing
    fs.check_access("s3://bucket/out", write=True)       # clear error before any work starts

Every input and output of the jobs may be a plain path, `file://...`, `s3://`, `gs://`, `hdfs://` (or
any fsspec protocol whose package is installed: s3fs ships with the product; gcsfs, pyarrow's HDFS
need their own packages and, for HDFS, libhdfs). Local paths stay plain absolute paths (Spark, img2dataset
and people read them as they are); remote ones stay URIs (`s3://bucket/key`).

Credentials come the standard way of each store: for S3 the AWS chain (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws, instance roles) and
AWS_ENDPOINT_URL for S3-compatible stores (MinIO, Ceph, R2, moto); for GCS application default
credentials. On a cluster the executors need the same environment (spark.executorEnv.* or roles).

Commit protocol. Object stores have no rename, so nothing here renames on them: every output object
has a deterministic name and is written once with one PUT (an object appears whole or not at all),
and each unit of work writes its done marker LAST. Readers and resume trust only units with markers;
an interrupted unit is simply rewritten under the same names. On local disks a write still goes to a
hidden temporary and is renamed, so readers never see a half-written file there either.
Listings never come from a cache: executors write while the driver lists.
"""
from __future__ import annotations

import errno
import io
import json
import os
import posixpath
import re
import shutil
import uuid
from contextlib import contextmanager
from functools import lru_cache

import pyarrow as pa
import pyarrow.parquet as pq

LOCAL_PROTOCOLS = ("file", "local")


class StorageAccessError(PermissionError):
    """A location that cannot be used as given (no such bucket, denied credentials, unreachable)."""


# errors of a store that stopped answering (botocore / aiobotocore, aiohttp under s3fs / gcsfs), by class
# name: they also arrive as text inside a Spark task's error, where no exception object survives
UNREACHABLE_ERRORS = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                      "ServerDisconnectedError", "ConnectionClosedError")
_ENDPOINT_IN_TEXT = re.compile(r'Could not connect to the endpoint URL: "(\w+://[^/"]+)')


def unreachable_store(err: BaseException) -> str | None:
    """'the object store at URL' (or 'the object store') when `err` - or an error it carries, or the task error
    text Spark wraps - is a store that stopped answering; None for anything else."""
    seen, texts = set(), []
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ in UNREACHABLE_ERRORS:
            texts.append(f"{type(err).__name__}: {err}")
        elif any(f"{name}:" in str(err) for name in UNREACHABLE_ERRORS):
            texts.append(str(err))
        err = err.__cause__ or err.__context__
    if not texts:
        return None
    found = _ENDPOINT_IN_TEXT.search(" ".join(texts))
    return f"the object store at {found.group(1)}" if found else "the object store"


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def normalize(uri: str) -> str:
    """Local paths (and file:// URIs) -> absolute plain paths; remote URIs unchanged, no trailing '/'."""
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_remote(uri):
        return uri.rstrip("/")
    return os.path.abspath(uri)


def protocol(uri: str) -> str:
    return str(uri).split("://", 1)[0] if is_remote(uri) else "file"


# what selects credentials and endpoint: a changed environment gets a new client, not a cached one
_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
             "GOOGLE_APPLICATION_CREDENTIALS")


def _filesystem(proto: str):
    # per process too: async clients (s3fs) are not fork-safe, and DataLoader / Spark workers fork
    return _cached_filesystem(proto, tuple(os.environ.get(k) for k in _ENV_KEYS), os.getpid())


@lru_cache(maxsize=16)
def _cached_filesystem(proto: str, _env: tuple, _pid: int):
    import fsspec
    try:
        if proto in ("s3", "s3a"):
            # no listing cache: executors add parts while the driver lists
            endpoint = os.environ.get("AWS_ENDPOINT_URL")
            return fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True,
                                     **({"endpoint_url": endpoint} if endpoint else {}))
        if proto == "file":
            return fsspec.filesystem("file")
        return fsspec.filesystem(proto, use_listings_cache=False, skip_instance_cache=True)
    except (ImportError, ValueError) as e:
        raise StorageAccessError(f"no filesystem for {proto}:// URIs here ({e}); install its fsspec package "
                                 f"(gcsfs for gs://, adlfs for az://; hdfs:// needs pyarrow with libhdfs)") from e


def filesystem(uri: str):
    """(fsspec filesystem, path as that filesystem names it)."""
    uri = normalize(uri)
    if not is_remote(uri):
        return _filesystem("file"), uri
    proto, rest = uri.split("://", 1)
    return _filesystem(proto), rest


def _uri(proto: str, path: str) -> str:
    return path if proto == "file" else f"{proto}://{path}"


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def basename(uri: str) -> str:
    return posixpath.basename(str(uri).rstrip("/")) if is_remote(uri) else os.path.basename(uri)


def dirname(uri: str) -> str:
    return posixpath.dirname(str(uri).rstrip("/")) if is_remote(uri) else os.path.dirname(uri)


# ---------------------------------------------------------------- queries

def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def isdir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.isdir(path)


def isfile(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.isfile(path)


def listdir(uri: str) -> list[str]:
    """Names in a folder (sorted); [] when it does not exist. Object stores: 'folders' are prefixes."""
    if not is_remote(uri):
        uri = normalize(uri)
        return sorted(os.listdir(uri)) if os.path.isdir(uri) else []
    fs, path = filesystem(uri)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})


def files(uri: str, suffix: str = "") -> list[str]:
    """Files of a folder ending in `suffix`, hidden ('.', '_') names skipped, sorted, as URIs."""
    uri = normalize(uri)
    return [join(uri, n) for n in listdir(uri) if n.endswith(suffix) and not n.startswith((".", "_"))
            and isfile(join(uri, n))] if not is_remote(uri) else _remote_files(uri, suffix)


def _remote_files(uri: str, suffix: str) -> list[str]:
    fs, path = filesystem(uri)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(_uri(protocol(uri), e["name"]) for e in entries if e["type"] == "file"
                  and e["name"].endswith(suffix) and not posixpath.basename(e["name"]).startswith((".", "_")))


def glob(pattern: str, recursive: bool = True) -> list[str]:
    fs, path = filesystem(pattern)
    proto = protocol(pattern)
    if proto == "file":
        import glob as _glob
        return sorted(_glob.glob(path, recursive=recursive))
    return sorted(_uri(proto, p) for p in fs.glob(path))


def has_magic(uri: str) -> bool:
    return any(ch in str(uri) for ch in "*?[")


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(fs.size(path))


def version_tag(uri: str) -> str:
    """What changes when the object changes: mtime (local) or ETag / generation / mtime (stores)."""
    if not is_remote(uri):
        return str(os.stat(uri).st_mtime_ns)
    fs, path = filesystem(uri)
    info = fs.info(path)
    for k in ("ETag", "etag", "generation", "md5Hash", "LastModified", "mtime", "last_modified"):
        if info.get(k) is not None:
            return str(info[k]).strip('"')
    return ""


def identity(uri: str) -> str:
    """name|size|version of a file, for input fingerprints (a changed file is another input)."""
    return f"{basename(uri)}|{size(uri)}|{version_tag(uri)}"


def _containment_form(uri: str) -> str:
    """A location as compared for containment: symlinks and '..' resolved on local disks; on stores
    protocol aliases folded (s3a:// is s3://) and no trailing '/'."""
    uri = normalize(uri)
    if not is_remote(uri):
        return os.path.realpath(uri)
    proto, rest = uri.split("://", 1)
    proto = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}.get(proto, proto)
    return f"{proto}://{posixpath.normpath(rest).lstrip('/')}"


def overlaps(a: str, b: str) -> str | None:
    """How location a relates to b: 'is', 'is inside', 'contains', or None when they are apart."""
    x, y = _containment_form(a), _containment_form(b)
    if x == y:
        return "is"
    sep = "/" if is_remote(x) else os.sep
    if x.startswith(y.rstrip(sep) + sep):
        return "is inside"
    if y.startswith(x.rstrip(sep) + sep):
        return "contains"
    return None


# ---------------------------------------------------------------- reading

def open(uri: str, mode: str = "rb", **kw):  # noqa: A001 - the module is used as `storage.open`
    fs, path = filesystem(uri)
    return fs.open(path, mode, **kw)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def read_many(uris: list[str]) -> dict[str, bytes]:
    """Small objects fetched concurrently (markers): {uri: bytes}."""
    if not uris:
        return {}
    if not is_remote(uris[0]):
        return {u: read_bytes(u) for u in uris}
    fs, _ = filesystem(uris[0])
    proto = protocol(uris[0])
    got = fs.cat([filesystem(u)[1] for u in uris])
    return {_uri(proto, p): b for p, b in got.items()}


def parquet_file(uri: str) -> pq.ParquetFile:
    if not is_remote(uri):
        return pq.ParquetFile(uri)
    return pq.ParquetFile(open(uri, "rb"))


def read_parquet(uris: str | list[str], columns: list[str] | None = None, schema: pa.Schema | None = None
                 ) -> pa.Table:
    """Files or folders (their visible *.parquet files) as one table; with `schema`, cast to it (and an
    empty table of it when there are no files)."""
    uris = [uris] if isinstance(uris, str) else uris
    paths = [p for u in uris for p in ([u] if isfile(u) else files(u, ".parquet"))]
    tables = [parquet_file(p).read(columns=columns) for p in paths]
    if not tables:
        if schema is None:
            raise FileNotFoundError(f"no Parquet files in {', '.join(uris)}")
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    if schema is not None:
        target = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        tables = [_with_nullable_columns(t, target).select(target.names).cast(target) for t in tables]
    return pa.concat_tables(tables)


def _with_nullable_columns(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A file written before a nullable column was added to its schema reads with that column null."""
    for field in schema:
        if field.name not in table.column_names and field.nullable:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table


# ---------------------------------------------------------------- writing (write once, marker last)

class StorageError(OSError):
    """Disk full (or quota, read-only, I/O error) while writing an output: one line for people."""


# errors of the storage, not of the data: the job stops with one clear line and a rerun resumes
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only filesystem", errno.EIO: "I/O error", errno.EFBIG: "file too large"}


def storage_error(path: str, err: OSError, needed_bytes: int | None = None) -> StorageError:
    folder = dirname(path) or "."
    try:
        if is_remote(folder):
            raise OSError("no local free space for a store")
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    need = f"needs up to {needed_bytes / 1e6:.1f} MB, " if needed_bytes else ""
    return StorageError(err.errno, f"{STORAGE_ERRNOS.get(err.errno, err.strerror)} writing {path} ({need}{free} "
                                   f"on that filesystem); temporaries removed - free space and rerun the same "
                                   f"command to resume")


@contextmanager
def writing(path: str, tmp: str, needed_bytes: int | None = None):
    """Around a write to `tmp` that is renamed to `path`: the temporary is removed on any failure,
    and storage errors become StorageError naming the path and the space needed / free."""
    try:
        yield
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, StorageError) and e.errno in STORAGE_ERRNOS:
            raise storage_error(path, e, needed_bytes) from e
        raise



def makedirs(uri: str) -> None:
    """Local folders only: object stores have no folders to create."""
    if not is_remote(uri):
        os.makedirs(uri, exist_ok=True)


@contextmanager
def local_commit(path: str, needed_bytes: int | None = None):
    """`with local_commit(path) as tmp:` write tmp; it is renamed to `path` when the block ends, removed
    when it fails (storage errors such as a full disk become one line: writing)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    with writing(path, tmp, needed_bytes):
        yield tmp
        os.replace(tmp, path)


def write_bytes(uri: str, data: bytes) -> None:
    """Whole object at its final name: one PUT on stores, temporary + rename on local disks."""
    uri = normalize(uri)
    if is_remote(uri):
        fs, path = filesystem(uri)
        fs.pipe_file(path, data)
        return
    with local_commit(uri, len(data)) as tmp, io.open(tmp, "wb") as fh:
        fh.write(data)


def write_json(uri: str, obj) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def write_parquet(table: pa.Table, uri: str, compression: str = "zstd") -> None:
    uri = normalize(uri)
    if is_remote(uri):
        buf = io.BytesIO()    # one PUT of the finished file: no half-written object is ever visible
        pq.write_table(table, buf, compression=compression)
        write_bytes(uri, buf.getvalue())
        return
    with local_commit(uri, table.nbytes) as tmp:
        pq.write_table(table, tmp, compression=compression)


def upload(local_path: str, uri: str) -> None:
    """A finished local file to its place (e.g. a checkpoint staged on local disk)."""
    uri = normalize(uri)
    if is_remote(uri):
        fs, path = filesystem(uri)
        fs.put_file(local_path, path)
    elif os.path.abspath(local_path) != uri:
        import shutil
        with local_commit(uri, os.path.getsize(local_path)) as tmp:
            shutil.copyfile(local_path, tmp)


def download(uri: str, local_path: str) -> None:
    fs, path = filesystem(uri)
    os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
    fs.get_file(path, local_path)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def remove_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- access check

def check_access(uri: str, write: bool = False) -> None:
    """Fail before any work when a remote location cannot be used: missing bucket, denied or missing
    credentials, unreachable endpoint. `write` also proves that an object can be created (and removes it)."""
    if not is_remote(uri):
        return
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    where = f"{protocol(uri)}://{bucket}"
    hint = _credentials_hint(protocol(uri))
    try:
        try:
            fs.info(bucket)   # raises: exists() would hide denied credentials behind "False"
        except FileNotFoundError:
            raise StorageAccessError(f"bucket {where} does not exist - needed for {uri}; create it or fix the "
                                     f"URI. {hint}") from None
        if write:
            probe = posixpath.join(path, f".catcurate-access-probe-{uuid.uuid4().hex}")
            fs.pipe_file(probe, b"probe")
            fs.rm_file(probe)
        elif not has_magic(path) and not fs.exists(path):   # a pattern's matches are listed by the caller
            raise StorageAccessError(f"{uri} does not exist")
    except StorageAccessError:
        raise
    except PermissionError as e:
        raise StorageAccessError(f"access to {uri} denied: {e}. {hint}") from None
    except Exception as e:  # noqa: BLE001 - botocore / aiohttp errors (unreachable endpoint, ...)
        raise StorageAccessError(f"cannot use {uri}: {type(e).__name__}: {e}. {hint}") from None


def _credentials_hint(proto: str) -> str:
    if proto in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        return ("Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role"
                + (f"; endpoint AWS_ENDPOINT_URL={endpoint}" if endpoint else
                   "; set AWS_ENDPOINT_URL for an S3-compatible store") + ".")
    if proto in ("gs", "gcs"):
        return "Credentials come from GOOGLE_APPLICATION_CREDENTIALS or gcloud's application default login."
    return ""
