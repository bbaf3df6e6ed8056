"""Download stage: img2dataset fetches the images of the rows that passed the caption stage.

    shards = run_download(out, DownloadParams(), distributor="multiprocessing")

Input is OUTPUT/_work/download_input/*.parquet (url, caption, cat_key, cat_part), written by the
caption stage for its passed rows only (on LAION most rows fail the caption rules, so most of the
bandwidth is saved). Output is img2dataset's own Parquet layout in OUTPUT/_work/images/, whose
cat_key / cat_part columns lead each image back to its caption parse. img2dataset's incremental mode
makes a rerun fetch only the shards it has not finished.
"""
from __future__ import annotations

import glob
import os
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
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    src = os.path.join(out, "_work", "download_input")
    dst = os.path.join(out, "_work", "images")
    if glob.glob(os.path.join(src, "*.parquet")):
        download(
            url_list=src, input_format="parquet", url_col="url", caption_col="caption",
            save_additional_columns=["cat_key", "cat_part"], output_folder=dst, output_format="parquet",
            number_sample_per_shard=rows_per_shard, distributor=distributor, incremental_mode="incremental",
            enable_wandb=False, **params.to_dict(),
        )
    return downloaded_shards(out)


def downloaded_shards(out: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out, "_work", "images", "*.parquet")))
