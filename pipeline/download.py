"""Download stage: img2dataset fetches the images of the rows that passed the caption stage.

    shards = run_download(out, DownloadParams(), distributor="multiprocessing")

Input is OUTPUT/_work/download_input/*.parquet (url, caption, cat_key, cat_part), written by the
caption stage for its passed rows only (on LAION most rows fail the caption rules, so most of the
bandwidth is saved). Output is img2dataset's own Parquet layout in OUTPUT/_work/images/, whose
cat_key / cat_part columns lead each image back to its caption parse. img2dataset's incremental mode
makes a rerun fetch only the shards it has not finished.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field

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

    def to_dict(self) -> dict:
        return asdict(self)


def run_download(out: str, params: DownloadParams, distributor: str, rows_per_shard: int) -> list[str]:
    """Fetch the images; locally in a child process, so img2dataset's spawned workers re-import a
    plain module instead of the caller's __main__ (a Spark driver or a test runner)."""
    if not glob.glob(os.path.join(out, "_work", "download_input", "*.parquet")):
        return []
    if distributor == "multiprocessing":
        cmd = [sys.executable, "-m", "pipeline.download", "--out", out, "--rows-per-shard", str(rows_per_shard),
               "--params", json.dumps(params.to_dict())]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH")) if p)}
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"img2dataset failed (exit {proc.returncode}); rerun to resume: {' '.join(cmd)}")
    else:
        _download(out, params, distributor, rows_per_shard)
    return downloaded_shards(out)


def _download(out: str, params: DownloadParams, distributor: str, rows_per_shard: int) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    download(
        url_list=os.path.join(out, "_work", "download_input"), input_format="parquet", url_col="url",
        caption_col="caption", save_additional_columns=["cat_key", "cat_part"],
        output_folder=os.path.join(out, "_work", "images"), output_format="parquet",
        number_sample_per_shard=rows_per_shard, distributor=distributor, incremental_mode="incremental",
        enable_wandb=False, **params.to_dict(),
    )


def downloaded_shards(out: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out, "_work", "images", "*.parquet")))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="img2dataset over OUT/_work/download_input (called by the filter)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows-per-shard", type=int, required=True)
    ap.add_argument("--params", required=True, help="DownloadParams as JSON")
    a = ap.parse_args()
    _download(a.out, DownloadParams(**json.loads(a.params)), "multiprocessing", a.rows_per_shard)
