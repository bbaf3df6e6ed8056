"""Webdataset tars of the filter's kept pairs, in img2dataset's layout, for open_clip's trainer.

    .venv/bin/catcurate filter --input laion/ --output out/filter --output-format webdataset
    .venv/bin/python -m pipeline.store.webdataset out/filter        # tars for an OUTPUT filtered earlier (no Spark)
    .venv/bin/python -m open_clip_train.main --dataset-type webdataset \
        --train-data 'out/filter/webdataset/{00000..00003}.tar' --train-num-samples N ...

The Parquet shards stay the canonical output (the ledger, distillation and our trainer use them);
the tars are a copy in the format open_clip_train and other webdataset readers take. One tar per
Parquet shard, numbered 00000, 00001, ... in sorted shard-name order, so brace patterns work; a
shard holds at most --shard-rows pairs (default 10,000, img2dataset's number_sample_per_shard), so
a tar does too. OUTPUT/webdataset/ gets, per tar NNNNN:
    NNNNN.tar          KEY.jpg (image: the shard's bytes, so with --text-action mask the masked JPEG),
                       KEY.txt (caption), KEY.json (key, url, caption, width,
                       height and the parse: objects, attributes, actions, complexity, has_action)
    NNNNN.parquet      img2dataset's sidecar: key, url, caption, status, error_message, width,
                       height (schemas.WEBDATASET_INDEX), so the filter reads the tars back as input
    NNNNN_stats.json   img2dataset-like counts, plus the Parquet shard the tar was made from
and sizes.json ({"NNNNN.tar": samples}), which lets open_clip_train do without --train-num-samples.

Labels: a tar's labels are those of its source shard, LABELS/shards/<source_shard> (NNNNN_stats.json
names it; distillation writes those files, key-aligned, for the Parquet shards); the trainer joins
them by key (model_training/data.py). No label file per tar is written.

KEY is the row's key when it is made of [A-Za-z0-9_~-] only (the product's hash keys and
img2dataset's numeric keys are); any other key is percent-encoded, with '.' encoded too: webdataset
groups members by the name up to the first '.', so a dot in a key would split a sample. The empty
key becomes '%empty' (no encoded key can: encoding writes upper-case hex). KEY.json and the sidecar
hold the key itself, and KEY.json of a renamed key the member name it was given ("member").

Commit protocol (object stores have no rename): every object is written once under its final name
through pipeline.store.storage (fsspec: s3://, gs://, file:// and local paths alike), tar first (streamed:
one multipart upload on S3), then the sidecar and the stats, and the done marker
OUTPUT/_done/webdataset/NNNNN.json LAST. A rerun converts only tars
without a marker; an interrupted tar is simply written again, byte for byte the same (fixed member
metadata). Readers trust a tar of a folder this product wrote only when its marker exists.
"""
from __future__ import annotations

import argparse
import io
import json
import posixpath
import re
import sys
import tarfile
from urllib.parse import quote

from pipeline.store import storage
from pipeline.store.partitions import done_parts
from schemas import SHARD, WEBDATASET_INDEX

STAGE = "webdataset"            # OUTPUT/webdataset/ and the marker folder OUTPUT/_done/webdataset/
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")   # what open_clip_train takes as the image of a sample
_SAFE_KEY = re.compile(r"[A-Za-z0-9_~-]+")
_PARSE = ("objects", "attributes", "actions", "complexity", "has_action")


EMPTY_KEY_STEM = "%empty"   # '%e' is never produced by percent-encoding (upper-case hex digits): no key maps here


def member_stem(key: str) -> str:
    """The tar member name of a key, without extension (see the module docstring). The encoding is
    one-to-one: safe keys contain no '%', encoded ones always do. The empty key, which would give the
    hidden, stem-less members '.jpg', '.txt' (webdataset readers skip them), is EMPTY_KEY_STEM."""
    if key == "":
        return EMPTY_KEY_STEM
    return key if _SAFE_KEY.fullmatch(key) else quote(key, safe="").replace(".", "%2E")


def split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the sample key is the path up to the first '.' of the file name, the rest
    (lower-cased) is the field: 'a/123.labels.json' -> ('a/123', 'labels.json')."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


# ---------------------------------------------------------------- writing
def plan_tars(output: str) -> list[tuple[str, str]]:
    """(tar number, source shard file name) for every Parquet shard of OUTPUT, in sorted name order."""
    names = [storage.basename(p) for p in storage.files(storage.join(storage.normalize(output), "shards"), ".parquet")]
    return [(f"{i:05d}", name) for i, name in enumerate(sorted(names))]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    info.mtime = 0   # fixed owner and time: a rewritten tar is byte-identical to the first
    tar.addfile(info, io.BytesIO(data))


def _sample_json(row: dict) -> bytes:
    doc = {k: row[k] for k in ("key", "url", "caption", "width", "height", *_PARSE)}
    if member_stem(row["key"]) != row["key"]:
        doc["member"] = member_stem(row["key"])   # the name an encoded or empty key was given in the tar
    return json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()


def write_tar(output: str, number: str, source_shard: str) -> dict:
    """OUTPUT/shards/<source_shard> -> OUTPUT/webdataset/<number>.{tar,parquet} + <number>_stats.json,
    then the marker. Streams the shard by row groups: memory holds one batch of images, not the shard.
    Returns the marker's content."""
    output = storage.normalize(output)
    source = storage.join(output, "shards", source_shard)
    folder = storage.join(output, STAGE)
    storage.makedirs(folder)
    tar_path = storage.join(folder, f"{number}.tar")
    index, image_bytes = [], 0
    with storage.open(tar_path, "wb") as dst:
        with tarfile.open(fileobj=dst, mode="w|") as tar:   # stream mode: no seeks, as object stores need
            for batch in storage.parquet_file(source).iter_batches(batch_size=256, columns=SHARD.columns):
                for row in batch.to_pylist():
                    if row["jpg"] is None:
                        continue   # a kept pair always has its image; never write a sample without one
                    stem = member_stem(row["key"])
                    _add_member(tar, f"{stem}.jpg", row["jpg"])
                    _add_member(tar, f"{stem}.txt", (row["caption"] or "").encode())
                    _add_member(tar, f"{stem}.json", _sample_json(row))
                    image_bytes += len(row["jpg"])
                    index.append({"key": row["key"], "url": row["url"], "caption": row["caption"],
                                  "status": "success", "error_message": None, "width": row["width"],
                                  "height": row["height"]})
    storage.write_parquet(WEBDATASET_INDEX.from_rows(index), storage.join(folder, f"{number}.parquet"))
    n = len(index)
    tar_bytes, source_bytes = storage.size(tar_path), storage.size(source)
    storage.write_json(storage.join(folder, f"{number}_stats.json"), {
        "count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
        "status_dict": {"success": n} if n else {}, "shard": number, "tar": f"{number}.tar",
        "source_shard": source_shard, "source_bytes": source_bytes, "bytes": tar_bytes, "image_bytes": image_bytes})
    marker = {"tar": f"{number}.tar", "count": n, "bytes": tar_bytes, "source_shard": source_shard,
              "source_bytes": source_bytes}
    storage.write_json(storage.join(output, "_done", STAGE, f"{number}.json"), marker)   # last: the commit
    return marker


def finish(output: str) -> int:
    """After every tar is written: OUTPUT/webdataset/sizes.json from the markers; returns the number of tars."""
    output = storage.normalize(output)
    markers = done_parts(output, STAGE)
    sizes, path = {m["tar"]: m["count"] for _, m in sorted(markers.items())}, storage.join(output, STAGE, "sizes.json")
    if markers and not (storage.isfile(path) and storage.read_json(path) == sizes):   # a rerun rewrites nothing
        storage.write_json(path, sizes)
    return len(markers)


def convert(output: str) -> int:
    """Every tar of OUTPUT without a marker, in this process (the filter runs one Spark task per tar
    instead); returns the number of tars."""
    output = storage.normalize(output)
    done = done_parts(output, STAGE)
    for number, shard in plan_tars(output):
        if number not in done:
            write_tar(output, number, shard)
    return finish(output)


# ---------------------------------------------------------------- reading (model_training/data.py)
def trusted_tars(tars: list[str]) -> tuple[list[str], list[str]]:
    """(trusted, untrusted) tars. A tar in a folder this product wrote (OUTPUT/webdataset/, with
    OUTPUT/_done/ beside it) is trusted only with its marker: without one it may be half written.
    Tars of other origin (img2dataset output) are trusted as they are."""
    trusted, untrusted, marked = [], [], {}
    for tar in tars:
        output = storage.dirname(storage.dirname(tar))
        if output not in marked:
            done = storage.join(output, "_done")
            marked[output] = set(storage.listdir(storage.join(done, STAGE))) if storage.isdir(done) else None
        names = marked[output]
        stem = storage.basename(tar)[: -len(".tar")]
        (trusted if names is None or f"{stem}.json" in names else untrusted).append(tar)
    return trusted, untrusted


def source_shard(tar: str) -> str | None:
    """The Parquet shard a tar was made from (its NNNNN_stats.json says), None for other tars."""
    try:
        return storage.read_json(tar[: -len(".tar")] + "_stats.json").get("source_shard")
    except (FileNotFoundError, ValueError, AttributeError):
        return None


def main(argv=None) -> int:
    from pipeline.store.locks import LockHeld, LockLost, folder_lock
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", help="a finished filter OUTPUT (folder or URI) with shards/*.parquet")
    a = ap.parse_args(argv)
    # tar numbers follow the sorted shard names: only a finished filter has its final set of shards
    if not storage.isfile(storage.join(storage.normalize(a.output), "stats.json")):
        print(f"webdataset: error: {a.output} has no stats.json: not a finished filter OUTPUT", file=sys.stderr)
        return 2
    try:
        with folder_lock(a.output, "webdataset"):   # not while a filter run writes OUTPUT
            n = convert(a.output)
    except (LockHeld, LockLost) as e:
        print(f"webdataset: error: {e}", file=sys.stderr)
        return 2
    print(f"{n} webdataset tar(s) in {storage.join(storage.normalize(a.output), STAGE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
