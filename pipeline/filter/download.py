"""Download stage: img2dataset fetches the images of the rows that passed the caption stage.

    shards = run_download(out, DownloadParams(), distributor="multiprocessing")

Input is OUTPUT/_work/download_input/*.parquet (url, caption, uid, cat_key, cat_part), written by the
caption stage for its passed rows only (on LAION most rows fail the caption rules, so most of the
bandwidth is saved). Output is img2dataset's own Parquet layout in OUTPUT/_work/images/, whose
cat_key / cat_part columns lead each image back to its caption parse. img2dataset's incremental mode
makes a rerun fetch only the shards it has not finished.

URL lists are untrusted, so every process that fetches does it through a guard (install_fetch_guard): the
local download child and its workers for the whole process, and on a cluster each executor for its fetching
threads (GuardedDownloader wraps img2dataset's downloader for its pyspark distributor; the executor's other
threads write to the trusted object store, which may sit on a private address). Every
host name is resolved, each address checked (blocked_category), and only checked addresses are
returned to img2dataset's HTTP client and connected to - redirects included, since each hop resolves
again. Loopback, link-local (cloud metadata at 169.254.169.254), private (RFC 1918, fc00::/7), CGNAT,
multicast, unspecified and reserved addresses are refused; the row gets the ledger reason
url_blocked_address. allow_private_addresses opens loopback / private / CGNAT for in-house mirrors.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import io
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field

import schemas as S
from pipeline.store import storage

GUARD_ENV = "CATCURATE_FETCH_GUARD"   # set in the download child only: "public" | "private"

# img2dataset's defaults unless a comment says why not
@dataclass(frozen=True)
class DownloadParams:
    image_size: int = 256
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    encode_quality: int = 95
    timeout: int = 10
    retries: int = 0
    processes_count: int = 2          # img2dataset defaults to 1; one per core here
    thread_count: int = 32            # img2dataset defaults to 256: too many for a 2-core machine
    min_image_size: int = 0
    max_aspect_ratio: float = float("inf")
    # honour the opt-out headers img2dataset checks (its CLI's recommended list)
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    user_agent_token: str | None = "catcurate"
    # ours, not img2dataset's: fetch from loopback / private / CGNAT too (in-house mirrors, tests)
    allow_private_addresses: bool = False
    # ours: a total deadline per request (connect + headers + body, every redirect hop; img2dataset's
    # timeout is per socket read, so a server trickling a byte at a time holds a thread for ever) and a
    # size cap enforced while the body is read (an endless body would fill the memory)
    max_seconds: float = 60.0
    max_image_bytes: int = 32 << 20

    def to_dict(self) -> dict:   # the limits only when changed: outputs of earlier versions still resume
        d = asdict(self)
        for name in OURS_SINCE_RESUME_IDENTITY:
            if d[name] == getattr(DownloadParams, name):
                del d[name]
        return d

    def img2dataset_kwargs(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("allow_private_addresses", *OURS_SINCE_RESUME_IDENTITY)}


OURS_SINCE_RESUME_IDENTITY = ("max_seconds", "max_image_bytes")
LIMITS_ENV = "CATCURATE_FETCH_LIMITS"   # set in the download child: "max_seconds,max_image_bytes"


# ---------------------------------------------------------------- safe fetching

# what allow_private_addresses opens: in-house networks, never link-local / metadata or reserved ranges
PRIVATE_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def blocked_category(address: str, allow_private: bool = False) -> str | None:
    """Why a connection to this IP address is refused ('loopback', 'link-local', ...), or None."""
    ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone id
    if ip.version == 6:  # IPv4 carried inside IPv6 is judged as that IPv4 address
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None) or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None)
        if embedded is not None:
            return blocked_category(str(embedded), allow_private)
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_link_local:
        return "link-local (cloud metadata)"
    if ip.is_multicast:
        return "multicast"
    if ip.is_loopback or any(ip in n for n in PRIVATE_NETWORKS):
        return None if allow_private else "loopback" if ip.is_loopback else "private"
    if not ip.is_global:
        return "reserved"
    return None


class BlockedAddress(OSError):
    """Raised instead of connecting; img2dataset records str() as the row's error message."""


def install_fetch_guard(allow_private: bool, fetch_threads_only: bool = False) -> None:
    """Resolve, check, then connect only to checked addresses, in this process (img2dataset's).

    fetch_threads_only: check only the threads fetching an image (inside limited_download_image), as in a
    Spark executor, whose other threads talk to the trusted object store (a private S3 endpoint, the
    instance-metadata address its credentials come from) and to the driver."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def checked_getaddrinfo(host, port, *args, **kwargs):
        if fetch_threads_only and threading.get_ident() not in _requests:
            return real_getaddrinfo(host, port, *args, **kwargs)
        results = real_getaddrinfo(host, port, *args, **kwargs)
        allowed = [r for r in results if r[0] not in (socket.AF_INET, socket.AF_INET6)
                   or blocked_category(r[4][0], allow_private) is None]
        if not allowed and results:
            address = results[0][4][0]
            raise BlockedAddress(f"{S.R_BLOCKED_ADDRESS}: {host} resolves to {address}, a "
                                 f"{blocked_category(address, allow_private)} address; not fetched")
        return allowed

    def checked_connect(sock, address):
        if fetch_threads_only and threading.get_ident() not in _requests:
            return real_connect(sock, address)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                ipaddress.ip_address(address[0].split("%")[0])
            except ValueError:  # a host name: resolve and check it here, connect to the checked address
                address = (checked_getaddrinfo(address[0], address[1], sock.family, sock.type)[0][4][0],
                           *address[1:])
            why = blocked_category(address[0], allow_private)
            if why:
                raise BlockedAddress(f"{S.R_BLOCKED_ADDRESS}: {address[0]} is a {why} address; not connected")
        return real_connect(sock, address)

    socket.getaddrinfo = checked_getaddrinfo
    socket.socket.connect = checked_connect


def failure_reason(error_message: str | None) -> str:
    """Ledger reason of a row img2dataset could not fetch."""
    for reason in (S.R_BLOCKED_ADDRESS, S.R_DOWNLOAD_TIMEOUT, S.R_TOO_LARGE):
        if (error_message or "").startswith(reason) or f"{reason}:" in (error_message or ""):
            return reason
    return S.R_DOWNLOAD_FAILED


# ---------------------------------------------------------------- total deadline and size cap

_requests: dict[int, dict] = {}          # thread id -> the request it is making: deadline, sockets, expired
_requests_lock = threading.Lock()
_watchdog: list = []


def _track_connect(real_connect):
    def connect(sock, address):
        req = _requests.get(threading.get_ident())
        if req is not None:
            req["socks"].append(sock)
        return real_connect(sock, address)
    return connect


def _watch() -> None:
    """Shuts down the sockets of requests past their deadline: a blocked read returns at once."""
    while True:
        time.sleep(0.2)
        now = time.monotonic()
        with _requests_lock:
            late = [r for r in _requests.values() if now > r["deadline"] and not r["expired"]]
        for req in late:
            req["expired"] = True
            for sock in req["socks"]:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def limited_download_image(row, timeout, user_agent_token, disallowed_header_directives, *,
                           max_seconds: float, max_bytes: int):
    """img2dataset's download_image (same arguments and result: key, BytesIO or None, error or None), with
    a total deadline per request and a size cap while reading. Errors start with the ledger reason."""
    from img2dataset.downloader import is_disallowed
    key, url = row
    if not _watchdog:
        with _requests_lock:
            if not _watchdog:
                socket.socket.connect = _track_connect(socket.socket.connect)
                _watchdog.append(threading.Thread(target=_watch, name="fetch-deadline", daemon=True))
                _watchdog[0].start()
    req = {"deadline": time.monotonic() + max_seconds, "socks": [], "expired": False}
    with _requests_lock:
        _requests[threading.get_ident()] = req
    agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"   # img2dataset's
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": agent})
        with urllib.request.urlopen(request, timeout=min(timeout, max_seconds)) as r:
            if disallowed_header_directives and is_disallowed(r.headers, user_agent_token,
                                                              disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            length = r.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                return key, None, f"{S.R_TOO_LARGE}: Content-Length {int(length):,} bytes > {max_bytes:,}; not read"
            body, n = io.BytesIO(), 0
            while True:
                chunk = r.read1(1 << 16)   # returns what arrived: the deadline and the cap are checked as it comes
                if not chunk:
                    break
                n += len(chunk)
                if n > max_bytes:
                    return key, None, f"{S.R_TOO_LARGE}: body over {max_bytes:,} bytes; reading stopped"
                if req["expired"] or time.monotonic() > req["deadline"]:
                    raise TimeoutError
                body.write(chunk)
            if req["expired"]:
                raise TimeoutError
        body.seek(0)
        return key, body, None
    except Exception as err:  # noqa: BLE001 - as img2dataset: the error becomes the row's error message
        if req["expired"] or time.monotonic() > req["deadline"]:
            return key, None, f"{S.R_DOWNLOAD_TIMEOUT}: no complete response within {max_seconds:g} s"
        return key, None, str(err)
    finally:
        with _requests_lock:
            _requests.pop(threading.get_ident(), None)


def install_fetch_limits(max_seconds: float, max_bytes: int) -> None:
    """img2dataset fetches through limited_download_image in this process."""
    import functools

    from img2dataset import downloader
    downloader.download_image = functools.partial(limited_download_image, max_seconds=max_seconds,
                                                  max_bytes=max_bytes)


class GuardedDownloader:
    """img2dataset's Downloader for its pyspark distributor: the first call in each executor process
    installs the address guard (on the fetching threads) and the deadline and size cap, then every call
    runs img2dataset's downloader. Pickled to the executors with the pipeline importable there."""

    def __init__(self, downloader, allow_private: bool, max_seconds: float, max_bytes: int):
        self.downloader, self.allow_private = downloader, allow_private
        self.max_seconds, self.max_bytes = max_seconds, max_bytes

    def __call__(self, row):
        with _requests_lock:
            if not _executor_guard:
                install_fetch_limits(self.max_seconds, self.max_bytes)
                install_fetch_guard(self.allow_private, fetch_threads_only=True)
                _executor_guard.append(os.getpid())
        return self.downloader(row)


_executor_guard: list = []


def run_download(out: str, params: DownloadParams, distributor: str, rows_per_shard: int) -> list[str]:
    """Fetch the images; locally in a child process, so img2dataset's spawned workers re-import a
    plain module instead of the caller's __main__ (a Spark driver or a test runner)."""
    if not storage.files(storage.join(out, "_work", "download_input"), ".parquet"):
        return []
    if distributor == "multiprocessing" and storage.is_remote(out):
        return _staged_download(out, params, rows_per_shard)
    if distributor == "multiprocessing":
        cmd = [sys.executable, "-m", "pipeline.filter.download", "--out", out, "--rows-per-shard", str(rows_per_shard),
               "--params", json.dumps(params.to_dict())]
        env = {**os.environ, GUARD_ENV: "private" if params.allow_private_addresses else "public",
               LIMITS_ENV: f"{params.max_seconds},{params.max_image_bytes}",
               "PYTHONPATH": os.pathsep.join(
            p for p in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH")) if p)}
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"img2dataset failed (exit {proc.returncode}); rerun to resume: {' '.join(cmd)}")
    else:  # img2dataset's pyspark distributor fetches in the executors: each installs the guard there
        _download(out, params, distributor, rows_per_shard)
    return downloaded_shards(out)


def _staged_download(out: str, params: DownloadParams, rows_per_shard: int) -> list[str]:
    """OUTPUT in an object store, fetching on this machine: the guarded process talks to the web only
    (its guard would refuse a private S3 endpoint and the instance-metadata address that credentials
    come from), so its input and output are staged on local disk and copied to and from the store here.
    A run killed meanwhile fetches again (the store gets nothing until the download is complete)."""
    import shutil
    import tempfile
    stage = tempfile.mkdtemp(prefix="catcurate-download-")
    try:
        for f in storage.files(storage.join(out, "_work", "download_input"), ".parquet"):
            storage.download(f, os.path.join(stage, "_work", "download_input", storage.basename(f)))
        run_download(stage, params, "multiprocessing", rows_per_shard)
        fetched = os.path.join(stage, "_work", "images")
        for name in sorted(os.listdir(fetched)):
            if os.path.isfile(os.path.join(fetched, name)):
                storage.upload(os.path.join(fetched, name), storage.join(out, "_work", "images", name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return downloaded_shards(out)


def _download(out: str, params: DownloadParams, distributor: str, rows_per_shard: int) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import importlib

    from img2dataset import download
    img2dataset_main = importlib.import_module("img2dataset.main")   # the package's `main` is a function

    if distributor == "pyspark":
        real_distributor = img2dataset_main.pyspark_distributor

        def guarded_distributor(processes_count, downloader, *args):
            guarded = GuardedDownloader(downloader, params.allow_private_addresses, params.max_seconds,
                                        params.max_image_bytes)
            return real_distributor(processes_count, guarded, *args)
        img2dataset_main.pyspark_distributor = guarded_distributor
    try:
        _img2dataset_download(download, out, params, distributor, rows_per_shard)
    finally:
        if distributor == "pyspark":
            img2dataset_main.pyspark_distributor = real_distributor


def _img2dataset_download(download, out: str, params: DownloadParams, distributor: str, rows_per_shard: int) -> None:
    download(
        url_list=storage.join(out, "_work", "download_input"), input_format="parquet", url_col="url",
        caption_col="caption", save_additional_columns=["uid", "cat_key", "cat_part"],
        output_folder=storage.join(out, "_work", "images"), output_format="parquet",  # fsspec: s3:// works
        number_sample_per_shard=rows_per_shard, distributor=distributor, incremental_mode="incremental",
        enable_wandb=False, **params.img2dataset_kwargs(),
    )


def downloaded_shards(out: str) -> list[str]:
    return storage.files(storage.join(out, "_work", "images"), ".parquet")


if os.environ.get(GUARD_ENV):  # the child and img2dataset's spawned workers (which import us as __mp_main__)
    install_fetch_guard(allow_private=os.environ[GUARD_ENV] == "private")
if os.environ.get(LIMITS_ENV):
    install_fetch_limits(float(os.environ[LIMITS_ENV].split(",")[0]), int(os.environ[LIMITS_ENV].split(",")[1]))

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="img2dataset over OUT/_work/download_input (called by the filter)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows-per-shard", type=int, required=True)
    ap.add_argument("--params", required=True, help="DownloadParams as JSON")
    a = ap.parse_args()
    _download(a.out, DownloadParams(**json.loads(a.params)), "multiprocessing", a.rows_per_shard)
