"""Text-spot stage of the CAT filter for one part of images (one Spark task; no Spark in here).

    rows = rows_from_chunk(chunk, columns, out)          # images came with the input
    rows = rows_from_download_shard(shard_path, out)     # images fetched by img2dataset
    counts = run_image_part(part, rows, out, params)
    counts = run_image_part(part, rows, out, params, stored=read_evidence(src, part))  # jobs/redecide.py

Each row is decoded safely (pipeline.media.images), spotted for text (pipeline.filter.textspot, batched) and
matched against its caption by the DiHT rule. Kept pairs go to OUTPUT/shards/<part>.parquet with
their caption parse; every row gets its ledger row in OUTPUT/ledger/textspot/<part>.parquet (or
stage download when the image never arrived), a few thumbnails per reason go to the report's table.
A pair whose image shows its caption is dropped (text_spotted), or with ImageStageParams.text_action
"mask" kept with the matching words' boxes filled (pipeline.filter.mask; ledger kept / text_masked with
the masked words, the masked JPEG in the shard, the report's picture the original beside it).

Every detection of every decoded image is stored in OUTPUT/ocr/<part>.parquet (schemas.OCR), not
only the one that decided, and the spotter runs with recording settings (read_min_chars,
reread_below) instead of the decision thresholds and without caption-guided shortcuts, so what was
read does not depend on --min-conf / --min-chars: given `stored`, run_image_part skips the spotter
and applies the rule to the stored detections, which is what a fresh run with those thresholds
decides (jobs/redecide.py).
"""
from __future__ import annotations

import io
import os
import tarfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields, replace

import pyarrow.compute as pc
from PIL import Image

import schemas as S
from pipeline.media import images as img
from pipeline.store import storage
from pipeline.filter import mask as mk
from pipeline.filter import spotting, textspot as ts
from pipeline.media.devices import select_device
from pipeline.filter.caption_stage import _count, ledger_row
from pipeline.filter.download import failure_reason
from pipeline.store.partitions import Chunk, Columns, atomic_write_parquet, read_chunk_salvaging, write_marker

_PARSE = [f.name for f in S.PARSE_FIELDS]
_CARRY = ["key", "caption", "url", *_PARSE, "source_file", "source_row"]


@dataclass(frozen=True)
class ImageStageParams:
    textspot: ts.TextSpotParams = field(default_factory=ts.TextSpotParams)
    max_pixels: int = img.DEFAULT_MAX_PIXELS   # decompression-bomb guard, checked before decoding
    shard_rows: int = 10_000                   # kept pairs per output shard file
    thumbs_per_reason: int = 8                 # report examples kept per reason and part
    thumb_size: int = 160
    # recording settings: what the spotter reads, independent of the decision thresholds in `textspot`,
    # so the stored detections serve any --min-conf and any --min-chars >= read_min_chars (redecide)
    read_min_chars: int = 3       # boxes too narrow for this many characters are not read (the spotter's
                                  #   min_chars box filter): 3 lets re-decisions go down to --min-chars 3
    reread_below: float = 0.8     # boxes read below this are read again from wider crops (DiHT's 0.8); fixed
                                  #   rather than following --min-conf, else readings would depend on it
    invariant_reading: bool = True  # on CPU, one crop per recogniser call: easyocr's int8 recogniser quantises
                                  #   a batch's activations with one scale, so a batched reading depends on the
                                  #   other crops in the batch ("shirt" 0.62 in one part, 0.87 in another: the
                                  #   verdict flips at 0.8), i.e. on which images share the part. ~5% more spot CPU
    text_action: str = "drop"     # an image showing its caption: drop the pair (DiHT) or keep it with the matching
                                  #   text masked in its JPEG (mask, T-MARS: ledger kept / text_masked; mask.py)

    def __post_init__(self):
        if self.text_action not in mk.TEXT_ACTIONS:
            raise ValueError(f"text_action {self.text_action!r}: one of {', '.join(mk.TEXT_ACTIONS)}")
        if self.textspot.min_chars < self.read_min_chars:
            raise ValueError(f"min_chars {self.textspot.min_chars} < read_min_chars {self.read_min_chars}: boxes "
                             f"that narrow are not read; lower read_min_chars too")

    def spotting(self) -> ts.TextSpotParams:
        """The spotter's settings: the recording settings in place of the decision thresholds."""
        spot = replace(self.textspot, min_conf=self.reread_below, min_chars=self.read_min_chars)
        if self.invariant_reading:
            if select_device() == "cpu":  # where this task's spotter runs. GPU: fp32, not quantised, batches
                                          #   read as crops alone do
                spot = replace(spot, recog_batch_size=1)
        return spot

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["text_action"] == "drop":   # recorded only when mask, so outputs of earlier versions still resume
            del d["text_action"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageStageParams":
        """Inverse of to_dict (a manifest's record); fields unknown to this version are ignored."""
        known = {f.name for f in fields(ts.TextSpotParams)}
        spot = {k: tuple(v) if isinstance(v, list) else v for k, v in d["textspot"].items() if k in known}
        spot.setdefault("engine", "easyocr")   # outputs written before the engine was recorded: easyocr read them
        spot.setdefault("match_blocks", False)   # ... and before blocks: lines only
        own = {f.name for f in fields(cls)} - {"textspot"}
        return cls(textspot=ts.TextSpotParams(**spot), **{k: v for k, v in d.items() if k in own})


def _passed_captions(out: str, part: str, keys: set | None = None) -> dict[str, dict]:
    t = storage.read_parquet(storage.join(out, "captions", f"{part}.parquet"), columns=_CARRY + ["passed"])
    t = t.filter(pc.field("passed"))
    return {r["key"]: r for r in t.select(_CARRY).to_pylist() if keys is None or r["key"] in keys}


def rows_from_chunk(chunk: Chunk, cols: Columns, out: str) -> list[dict]:
    """Passed rows of an input part, with the image bytes (and img2dataset status) from the input."""
    passed = sorted(_passed_captions(out, chunk.part).values(), key=lambda r: r["source_row"])
    if not passed:
        return []
    # tar members are named by img2dataset's key, also where another column (DataComp's uid) is our key
    member = "key" if chunk.tar and cols.key != "key" and "key" in storage.parquet_file(
        chunk.path).schema_arrow.names else cols.key
    wanted = list(dict.fromkeys(c for c in (cols.image, cols.status, cols.error, cols.key, member) if c))
    table, _ = read_chunk_salvaging(chunk, wanted)  # rows of corrupt row groups never passed
    local = [r["source_row"] - chunk.file_row_offset for r in passed]
    sub = table.take(local).to_pylist()
    tar_images = _tar_images(chunk.tar, {str(s[member]) for s in sub}) if chunk.tar and member else {}
    for r, s in zip(passed, sub):
        r["jpg"] = s.get(cols.image) if cols.image else tar_images.get(str(s.get(member)))
        r["status"] = s.get(cols.status) if cols.status else "success"
        r["error_message"] = s.get(cols.error) if cols.error else None
        if r["jpg"] is None and r["status"] == "success" and chunk.tar:
            r["error_message"] = f"image for key {s.get(member)} not found in {storage.basename(chunk.tar)}"
    return passed


def _tar_images(tar_path: str, keys: set) -> dict[str, bytes]:
    found = {}
    try:
        with storage.open(tar_path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
            for m in tf:
                stem, ext = os.path.splitext(m.name)
                if m.isfile() and ext.lower() in (".jpg", ".jpeg", ".png", ".webp") and stem in keys:
                    found[stem] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError):
        pass  # truncated tar: the members read so far count; the rest fail as missing images
    return found


def rows_from_download_shard(shard_path: str, out: str) -> list[dict]:
    """img2dataset output shard -> rows with bytes, joined to their caption parse by cat_key."""
    t = storage.read_parquet(shard_path, columns=["cat_key", "cat_part", "status", "error_message", "jpg"])
    rows = []
    by_part = defaultdict(list)
    for r in t.to_pylist():
        by_part[r["cat_part"]].append(r)
    for part in sorted(by_part):
        parses = _passed_captions(out, part, {r["cat_key"] for r in by_part[part]})
        for r in by_part[part]:
            base = parses.get(r["cat_key"])
            if base is not None:
                rows.append({**base, "jpg": r["jpg"], "status": r["status"], "error_message": r["error_message"]})
    return sorted(rows, key=lambda r: (r["source_file"], r["source_row"]))


class ChangedImage(ValueError):
    """Re-deciding: an image differs from the one whose detections are stored (the input changed)."""


def run_image_part(part: str, rows: list[dict], out: str, params: ImageStageParams,
                   stored: dict[str, list[ts.Detection]] | None = None,
                   stored_digests: dict[str, bytes] | None = None) -> dict:
    """Decide one part of images. With `stored` (key -> stored detections, read_evidence) nothing is
    spotted: the rule is applied to the detections an earlier run stored (jobs/redecide.py); with
    `stored_digests` (read_digests) every image must be the one those detections came from (ChangedImage)."""
    if stored is None:
        import torch
        # one Spark task per core: torch's own thread pool on top would oversubscribe the cores
        torch.set_num_threads(int(os.environ.get("CATCURATE_TASK_THREADS", "1")))
    ledger, shard, thumbs = [], [], defaultdict(list)
    # CPU seconds per step of this part (time.process_time: this task's process), in its marker for
    # bench/bench_filter.py's phase split; a few clock reads per part
    cpu, clock, wall = defaultdict(float), time.process_time(), time.perf_counter()
    decoded = []  # (row, DecodedImage) awaiting text spotting
    for r in rows:
        evidence = {k: r.get(k) for k in ("url", "caption", "complexity", "has_action", "source_file", "source_row")}
        if r["status"] != "success" or r["jpg"] is None:
            ledger.append(ledger_row(r["key"], S.FAILED, S.STAGE_DOWNLOAD, failure_reason(r.get("error_message")), **evidence,
                                     error_message=(r.get("error_message") or f"status {r['status']}")[:500]))
            continue
        try:
            decoded.append((r, img.decode_image(r["jpg"], max_pixels=params.max_pixels)))
        except img.ImageDecodeError as e:
            ledger.append(ledger_row(r["key"], S.FAILED, S.STAGE_TEXTSPOT, S.R_DECODE_ERROR, **evidence,
                                     error_message=str(e)[:500]))

    cpu["decode"] += time.process_time() - clock
    n_spotted = 0   # distinct images spotted
    if stored is None:
        found, n_spotted = _spot_unique_images(decoded, params, cpu) if decoded else ([], 0)
    else:
        missing = [r["key"] for r, _ in decoded if r["key"] not in stored]
        if missing:
            raise RuntimeError(f"part {part}: no stored OCR detections for {len(missing)} images "
                               f"(e.g. key {missing[0]!r}); this output cannot be re-decided")
        found = [stored[r["key"]] for r, _ in decoded]
        _check_digests(part, decoded, stored_digests or {})
    clock = time.process_time()
    atomic_write_parquet(S.OCR.from_rows([{"key": r["key"], "detections": [evidence_row(d) for d in dets],
                                           "digest": img.image_digest(r["jpg"])}
                                          for (r, _), dets in zip(decoded, found)]),
                         storage.join(out, "ocr", f"{part}.parquet"))
    cpu["write"] += time.process_time() - clock
    clock = time.process_time()
    rule = params.textspot
    for (r, d), detections in zip(decoded, found):
        evidence = {k: r.get(k) for k in ("url", "caption", "complexity", "has_action", "source_file", "source_row")}
        res = ts.TextSpotResult(detections, ts.caption_match(detections, r["caption"], rule.min_conf, rule.min_chars,
                                                             rule.match_blocks))
        best = max(res.detections, key=lambda t: t[1], default=None)
        masked = mk.masked_detections(detections, r["caption"], rule.min_conf, rule.min_chars, rule.match_blocks) \
            if res.match is not None and params.text_action == "mask" else []
        if res.match is not None and not masked:   # drop (or, masking, a match without boxes to fill)
            ledger.append(ledger_row(r["key"], S.DROPPED, S.STAGE_TEXTSPOT, S.R_TEXT_SPOTTED, **evidence,
                                     ocr_text=res.match.text, ocr_conf=float(res.match.conf),
                                     matched_span=res.match.span, ocr_engine=rule.engine))
            _add_thumb(thumbs, r["key"], S.R_TEXT_SPOTTED, d.image, params)
            continue
        if masked:   # kept with the matching text's boxes filled: the masked JPEG goes to the shard
            jpg = mk.mask_image(d.image, masked)
            ledger.append(ledger_row(r["key"], S.KEPT, S.STAGE_TEXTSPOT, S.R_TEXT_MASKED, **evidence,
                                     ocr_text=res.match.text, ocr_conf=float(res.match.conf),
                                     matched_span=res.match.span, ocr_engine=rule.engine,
                                     masked=[evidence_row(m) for m in masked]))
            if len(thumbs[S.R_TEXT_MASKED]) < params.thumbs_per_reason:   # the original beside the masked image
                thumbs[S.R_TEXT_MASKED].append({"key": r["key"], "reason": S.R_TEXT_MASKED,
                                                "jpg": side_by_side(d.image, jpg, params.thumb_size)})
        else:
            ledger.append(ledger_row(r["key"], S.KEPT, S.STAGE_TEXTSPOT, None, **evidence, ocr_engine=rule.engine,
                                     ocr_text=best[0] if best else None, ocr_conf=float(best[1]) if best else None))
            _add_thumb(thumbs, r["key"], "kept", d.image, params)
            jpg = r["jpg"] if d.source_format == "JPEG" else img.to_jpeg(d.image)
        shard.append({**{k: r[k] for k in ("key", "caption", "url", *_PARSE)},
                      "jpg": jpg, "width": d.width, "height": d.height})
    cpu["rule_and_thumbnails"] += time.process_time() - clock

    clock = time.process_time()
    for i in range(0, max(1, len(shard)), params.shard_rows):
        piece = shard[i:i + params.shard_rows]
        if piece:
            suffix = "" if i == 0 else f"-{i // params.shard_rows}"
            atomic_write_parquet(S.SHARD.from_rows(piece), storage.join(out, "shards", f"{part}{suffix}.parquet"))
    atomic_write_parquet(S.LEDGER.from_rows(ledger), storage.join(out, "ledger", S.STAGE_TEXTSPOT, f"{part}.parquet"))
    thumb_rows = [t for reason in sorted(thumbs) for t in thumbs[reason]]
    atomic_write_parquet(S.THUMBS.from_rows(thumb_rows), storage.join(out, "_work", "thumbs", f"{part}.parquet"))
    cpu["write"] += time.process_time() - clock
    counts = _count(ledger, len(rows), len(shard))
    if stored is None and decoded:
        counts["device"] = select_device()   # where this part was spotted (the Spark task's GPU, CUDA or CPU)
    counts["cpu_seconds"] = {step: round(s, 3) for step, s in cpu.items()}
    counts["n_images_spotted"] = n_spotted
    counts["wall_seconds"] = round(time.perf_counter() - wall, 3)
    write_marker(out, S.STAGE_TEXTSPOT, part, counts)
    return counts


def _spot_unique_images(decoded: list, params: ImageStageParams,
                        cpu: dict) -> tuple[list[list[tuple[str, float]]], int]:
    """Per row, every detection in its image; and the number of distinct images spotted. Each distinct
    image is spotted once (web data repeats images under several captions: reposts, multilingual
    alt-texts, datasets with 5 captions per photo), with the recording settings and without
    caption-guided shortcuts (every weak box re-read), so its detections serve every caption it comes
    with and every decision threshold. Adds the CPU seconds of its steps to `cpu` (decode: digests
    and pixel arrays)."""
    clock = time.process_time()
    first: dict[bytes, int] = {}
    images, slot = [], []
    for r, d in decoded:
        digest = img.image_digest(r["jpg"])
        if digest not in first:
            first[digest] = len(images)
            images.append(d.array())
        slot.append(first[digest])
    cpu["decode"] += time.process_time() - clock
    clock = time.process_time()
    spotter = spotting.get_spotter(params.spotting())
    cpu["load_spotter"] += time.process_time() - clock   # the first part of a Python worker loads the models
    before = dict(spotter.cpu_seconds)
    spotted = spotter.spot(images)
    for step, seconds in spotter.cpu_seconds.items():
        cpu[step] += seconds - before[step]
    return [spotted[j] for j in slot], len(images)


def _check_digests(part: str, decoded: list, digests: dict[str, bytes]) -> None:
    changed = [r for r, _ in decoded if digests.get(r["key"]) not in (None, img.image_digest(r["jpg"]))]
    if changed:
        files = sorted({str(r.get("source_file")) for r in changed})
        r = changed[0]
        raise ChangedImage(f"part {part}: {len(changed)} image(s) differ from the ones whose text was spotted (e.g. "
                           f"key {r['key']!r}, {r.get('source_file')} row {r.get('source_row')}): the input changed "
                           f"since; refusing to copy unchecked images. Run the filter afresh on "
                           f"{', '.join(files[:3])}{' and more' if len(files) > 3 else ''} into a new OUTPUT.")


def read_digests(out: str, part: str) -> dict[str, bytes]:
    """key -> digest of the image bytes whose detections OUTPUT/ocr/<part>.parquet stores ({} before digests
    were recorded)."""
    t = storage.read_parquet(storage.join(out, "ocr", f"{part}.parquet"), schema=S.OCR.arrow, columns=None)
    return {k: d for k, d in zip(t.column("key").to_pylist(), t.column("digest").to_pylist()) if d is not None}


def evidence_row(d) -> dict:
    """A detection (textspot.Detection, or a (text, conf) pair) as a schemas.OCR detections element."""
    box = d[2] if len(d) > 2 and d[2] is not None else (None,) * 4
    line = d[3] if len(d) > 3 else -1
    return {"text": d[0], "conf": float(d[1]), "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3], "line": line}


def detections_from_evidence(rows) -> list[ts.Detection]:
    """schemas.OCR detections elements (dicts) back to Detections (rows stored before boxes and lines
    were recorded: each word a line of its own, the rule they were decided with)."""
    out = []
    for d in rows or []:
        d = d.asDict() if hasattr(d, "asDict") else d   # Spark Rows (jobs/redecide.py's joins) or dicts
        box = None if d.get("x0") is None else (d["x0"], d["y0"], d["x1"], d["y1"])
        line = d.get("line")
        out.append(ts.Detection(d["text"], d["conf"], box, -1 if line is None else line))
    return out


def read_evidence(out: str, part: str) -> dict[str, list[ts.Detection]]:
    """The stored detections of one image part (OUTPUT/ocr/<part>.parquet): key -> [Detection]."""
    path = storage.join(out, "ocr", f"{part}.parquet")
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} is missing: {out} stores no OCR detections for part {part} "
                                f"(written before detections were stored?); run the filter again")
    t = storage.read_parquet(path, schema=S.OCR.arrow).to_pydict()
    return {k: detections_from_evidence(dets) for k, dets in zip(t["key"], t["detections"])}


def _add_thumb(thumbs, key, reason, image: Image.Image, params: ImageStageParams) -> None:
    if len(thumbs[reason]) < params.thumbs_per_reason:
        thumbs[reason].append({"key": key, "reason": reason, "jpg": thumbnail(image, params.thumb_size)})


def side_by_side(original: Image.Image, masked_jpg: bytes, size: int) -> bytes:
    """The report's picture of a masked row: the original's thumbnail and the masked image's, side by side
    (a 4-px white gap), as one JPEG."""
    left, right = original.copy(), img.decode_image(masked_jpg).image
    left.thumbnail((size, size))
    right.thumbnail((size, size))
    canvas = Image.new("RGB", (left.width + 4 + right.width, max(left.height, right.height)), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 4, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def thumbnail(image: Image.Image, size: int) -> bytes:
    im = image.copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def thumbnails_from_input(examples: list[dict], columns: dict[str, Columns], size: int = 160) -> dict[str, bytes]:
    """Report thumbnails for rows decided before any image was decoded (caption stage), read back
    from the input's image column by (source_file, source_row); a few rows, on the driver."""
    found = {}
    for r in examples:
        cols = columns.get(r.get("source_file"))
        if not cols or not cols.image or r.get("source_row") is None:
            continue
        try:
            pf = storage.parquet_file(r["source_file"])
            row, g = r["source_row"], 0
            while row >= pf.metadata.row_group(g).num_rows:
                row -= pf.metadata.row_group(g).num_rows
                g += 1
            data = pf.read_row_group(g, columns=[cols.image]).column(0)[row].as_py()
            found[r["key"]] = thumbnail(img.decode_image(data).image, size)
        except Exception:  # noqa: BLE001 - a report picture is optional; the row's evidence is not
            continue
    return found
