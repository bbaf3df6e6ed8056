"""Every table the product writes, defined once, usable as pyarrow and as Spark schemas.

    from schemas import LEDGER, SHARD
    pq.write_table(pa.Table.from_pylist(rows, schema=LEDGER.arrow), path)
    spark.read.schema(LEDGER.spark).parquet(path)

No other module spells column lists by hand: use `TABLE.columns` / `TABLE.arrow` / `TABLE.spark`.
Status and reason vocabularies for the ledger live here too, so reports and tests share them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa

# ---------------------------------------------------------------- ledger vocabulary
KEPT, DROPPED, FAILED = "kept", "dropped", "failed"
STATUSES = (KEPT, DROPPED, FAILED)

# stages in the order rows flow through them (score: DataComp-style filters on metadata columns, first)
STAGE_SCORE, STAGE_CAPTION, STAGE_DOWNLOAD, STAGE_TEXTSPOT, STAGE_DISTILL = (
    "score", "caption", "download", "textspot", "distill")
STAGES = (STAGE_SCORE, STAGE_CAPTION, STAGE_DOWNLOAD, STAGE_TEXTSPOT, STAGE_DISTILL)

# reasons: dropped = the data is fine but fails a rule; failed = the data could not be processed
R_EMPTY_CAPTION = "empty_caption"            # dropped: null / empty / whitespace-only caption
R_NON_STRING = "caption_not_string"          # failed: caption column holds a non-string value
R_INVALID_UTF8 = "caption_invalid_utf8"      # failed: caption bytes are not valid UTF-8
R_DUPLICATE = "duplicate"                    # dropped: same key as an earlier input row
R_NO_ACTION = "caption_no_action"            # dropped: no action relation in the caption
R_LOW_COMPLEXITY = "caption_low_complexity"  # dropped: complexity below the threshold
R_TOO_LONG = "caption_too_long"              # dropped: caption longer than max_caption_chars
R_READ_ERROR = "input_read_error"            # failed: the rows' Parquet row group is unreadable
R_DOWNLOAD_FAILED = "download_failed"        # failed: img2dataset could not fetch the image
R_DECODE_ERROR = "image_decode_error"        # failed: bytes are not a decodable, safe image
R_TEXT_SPOTTED = "text_spotted"              # dropped: the image shows the caption as text
R_EMBED_FAILED = "embed_failed"              # failed: the teacher could not embed the image
R_BAD_URL = "url_not_http"                   # failed: URL missing or not http(s); never fetched
R_UNACCOUNTED = "missing_from_stage_output"  # failed: a stage returned no result for the row (logged)
R_BLOCKED_ADDRESS = "url_blocked_address"    # failed: host is/resolves to a loopback, private, link-local... address
R_SCORE_BELOW = "score_below_threshold"      # dropped: a metadata score (e.g. clip_l14_similarity_score) below its threshold
R_SCORE_MISSING = "score_missing"            # failed: the score a filter needs is null or NaN
R_DOWNLOAD_TIMEOUT = "download_timeout"      # failed: no complete response within the total deadline per request
R_TOO_LARGE = "too_large"                    # failed: the response body exceeded --max-image-bytes (not read further)
R_TEXT_MASKED = "text_masked"                # KEPT (--text-action mask): the caption text the image shows is
                                             #   masked in the shard's JPEG (T-MARS); the only reason of a kept row
KEPT_REASONS = (R_TEXT_MASKED,)              # reasons a kept row may carry (kept, but changed); others: null
REASONS = (R_EMPTY_CAPTION, R_NON_STRING, R_INVALID_UTF8, R_DUPLICATE, R_NO_ACTION, R_LOW_COMPLEXITY,
           R_TOO_LONG, R_READ_ERROR, R_DOWNLOAD_FAILED, R_DECODE_ERROR, R_TEXT_SPOTTED, R_EMBED_FAILED,
           R_BAD_URL, R_UNACCOUNTED, R_BLOCKED_ADDRESS, R_SCORE_BELOW, R_SCORE_MISSING, R_DOWNLOAD_TIMEOUT,
           R_TOO_LARGE, R_TEXT_MASKED)


@dataclass(frozen=True)
class Table:
    name: str
    fields: tuple[pa.Field, ...]

    @cached_property
    def arrow(self) -> pa.Schema:
        return pa.schema(list(self.fields))

    @cached_property
    def spark(self):
        from pyspark.sql.pandas.types import from_arrow_schema  # lazy: pipeline/ must not need Spark
        return from_arrow_schema(self.arrow)

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.fields]

    def empty(self) -> pa.Table:
        return self.arrow.empty_table()

    def from_rows(self, rows: list[dict]) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=self.arrow)


def _f(name, typ, nullable=True):
    return pa.field(name, typ, nullable=nullable)


_STR_LIST = pa.list_(pa.string())
ATTRIBUTES_TYPE = pa.list_(pa.struct([_f("object", pa.string()), _f("values", _STR_LIST)]))
ACTIONS_TYPE = pa.list_(pa.struct([_f("subject", pa.string()), _f("verb", pa.string()), _f("object", pa.string())]))

PARSE_FIELDS = (
    _f("objects", _STR_LIST),
    _f("attributes", ATTRIBUTES_TYPE),   # object -> its attribute words, as a list of structs
    _f("actions", ACTIONS_TYPE),         # (subject, verb, object), None where absent
    _f("complexity", pa.int32()),
    _f("has_action", pa.bool_()),
)

SOURCE_FIELDS = (
    _f("source_file", pa.string()),      # input file the row came from
    _f("source_row", pa.int64()),        # row index inside that file
)

# every input row with its parse (caption stage output)
CAPTIONS = Table("captions", (
    _f("key", pa.string(), False), _f("url", pa.string()), _f("caption", pa.string()),
    *PARSE_FIELDS,
    _f("passed", pa.bool_()),            # passed the caption rules (goes on to the image stages)
    _f("reason", pa.string()),           # why not, when not passed
    *SOURCE_FIELDS,
))

# work table of the dedupe pass: every input row's key, content hash (url + caption) and position
KEYS = Table("keys", (_f("key", pa.string(), False), _f("content", pa.string(), False),
                      _f("part", pa.string(), False), _f("row", pa.int64(), False)))

# report thumbnails of dropped/failed rows (a few per reason and part), joined to the ledger by key
THUMBS = Table("thumbs", (_f("key", pa.string(), False), _f("reason", pa.string()), _f("jpg", pa.binary())))

# one OCR detection (a word): its text, confidence (float64, the value the rule compared, so a re-decision
# compares exactly the same numbers), box x0, y0, x1, y1 in the image's pixels and its line (words on one
# baseline; -1: alone)
DETECTIONS_TYPE = pa.list_(pa.struct([_f("text", pa.string()), _f("conf", pa.float64()),
                                      _f("x0", pa.float32()), _f("y0", pa.float32()), _f("x1", pa.float32()),
                                      _f("y1", pa.float32()), _f("line", pa.int32())]))

# exactly one row per input row across all stages; evidence columns are null where not applicable
LEDGER = Table("ledger", (
    _f("key", pa.string(), False),
    _f("status", pa.string(), False),    # kept | dropped | failed
    _f("stage", pa.string(), False),     # the stage that decided
    _f("reason", pa.string()),           # null for kept (but text_masked: kept with the text masked)
    _f("url", pa.string()),
    _f("caption", pa.string()),          # truncated to 1,000 chars: the ledger is for people
    _f("complexity", pa.int32()),
    _f("has_action", pa.bool_()),
    _f("ocr_text", pa.string()),
    _f("ocr_conf", pa.float32()),
    _f("matched_span", pa.string()),
    _f("ocr_engine", pa.string()),       # text-spot stage: the engine that read the image (easyocr | ppocr)
    _f("error_message", pa.string()),
    *SOURCE_FIELDS,
    _f("score_column", pa.string()),     # stage score: the metadata column that decided,
    _f("score", pa.float64()),           #   its value in this row (null when missing / NaN)
    _f("score_threshold", pa.float64()), #   and the threshold it was compared with (value >= threshold passes)
    _f("masked", DETECTIONS_TYPE),       # reason text_masked: the detections whose boxes were filled (text, box)
))

# every OCR detection of every image the text-spot stage read (OUTPUT/ocr/<part>.parquet), in the
# spotter's order (largest box first), none left out: the evidence jobs/redecide.py re-decides from.
# digest: pipeline.media.images.image_digest of the bytes read, so a re-decision copies only the image that
# was spotted (null in outputs written before it was recorded)
OCR = Table("ocr", (_f("key", pa.string(), False), _f("detections", DETECTIONS_TYPE), _f("digest", pa.binary())))

# training-ready kept pairs (OUTPUT/shards/*.parquet)
SHARD = Table("shard", (
    _f("key", pa.string(), False), _f("caption", pa.string()), _f("url", pa.string()),
    _f("jpg", pa.binary()), _f("width", pa.int32()), _f("height", pa.int32()),
    *PARSE_FIELDS,
))

# sparse top-k concept pseudo-labels (LABELS/shards/*.parquet), key-aligned with SHARD
LABELS = Table("labels", (
    _f("key", pa.string(), False),
    _f("object_indices", pa.list_(pa.int32())),
    _f("object_probs", pa.list_(pa.float32())),
    _f("attribute_indices", pa.list_(pa.int32())),
    _f("attribute_probs", pa.list_(pa.float32())),
))

# img2dataset's sidecar of a webdataset tar (OUTPUT/webdataset/NNNNN.parquet): one row per sample in the
# tar, no image bytes; img2dataset's column names, so the filter reads the tars back as img2dataset output
WEBDATASET_INDEX = Table("webdataset_index", (
    _f("key", pa.string(), False), _f("url", pa.string()), _f("caption", pa.string()),
    _f("status", pa.string()), _f("error_message", pa.string()), _f("width", pa.int32()), _f("height", pa.int32()),
))

ALL_TABLES = (CAPTIONS, KEYS, THUMBS, LEDGER, OCR, SHARD, LABELS, WEBDATASET_INDEX)
