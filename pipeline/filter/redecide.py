"""Re-deciding the CAT filter from stored evidence (no Spark in here; jobs/redecide.py wires it).

    from pipeline.filter.redecide import source_params, apply_changes, redecide_caption_part, count_outcomes
    caption, image = source_params(manifest["resume_identity"])          # what the source computed
    caption, image = apply_changes(caption, image, {"min_complexity": 2, "min_conf": 0.7})  # or NotRedecidable

The evidence a filter output keeps: captions/ (every row's parse and caption verdict), ocr/ (every
detection of every image read, with text and confidence; schemas.OCR) and the ledger (what could
not be processed at all). A threshold can be re-decided when a fresh run with the new value would
have computed nothing the source did not:

  min_complexity     >= the source's      rows below it were dropped and never text-spotted
  require_action     may be switched on   captions without an action were never text-spotted
  max_caption_chars  <= the source's      longer captions were never parsed
  min_conf           any value in [0, 1]  every detection is stored with its confidence
  min_chars          >= read_min_chars    narrower boxes were never read (recording setting, default 3)
  shard_rows, thumbs_per_reason, thumb_size   any (output layout only)
  text_action        drop or mask         every detection is stored with its box (pipeline/filter/mask.py)

Everything else describes how the evidence was computed - the parser's settings, the engine
(easyocr | ppocr), the detector and recogniser (canvas_min, canvas_size, line_gap, heat-map
thresholds, box filters, re-read margins, max_boxes, bf16), the
recording settings read_min_chars / reread_below, max_pixels, the download options, the input - and
is refused with the reason; changing those needs a fresh `make filter`.
"""
from __future__ import annotations

import io
import itertools
from collections import Counter
from dataclasses import asdict, fields, replace
from typing import Iterable

import schemas as S
from pipeline.filter import captions as cap
from pipeline.filter import score_stage
from pipeline.store import storage
from pipeline.filter import textspot as ts
from pipeline.filter.caption_stage import _count, _ledger_row
from pipeline.filter.image_stage import ImageStageParams, detections_from_evidence
from pipeline.filter import mask
from pipeline.filter.mask import TEXT_ACTIONS
from pipeline.store.partitions import Chunk, atomic_write_parquet, write_marker

CAPTION_THRESHOLDS = ("min_complexity", "require_action", "max_caption_chars")
TEXT_THRESHOLDS = ("min_conf", "min_chars")
LAYOUT = ("shard_rows", "thumbs_per_reason", "thumb_size")
ACTIONS = ("text_action",)   # what a text-spot match does (drop | mask): the boxes are stored with every detection
THRESHOLDS = CAPTION_THRESHOLDS + TEXT_THRESHOLDS
PARSED_REASONS = (S.R_NO_ACTION, S.R_LOW_COMPLEXITY)  # caption verdicts given after parsing: re-decidable
_PARSE = [f.name for f in S.PARSE_FIELDS]


class NotRedecidable(ValueError):
    """The stored evidence cannot support the requested change: a fresh filter run is needed."""


# ---------------------------------------------------------------- what may change
def source_params(identity: dict) -> tuple[cap.CaptionParams, ImageStageParams | None]:
    """The caption and image parameters a filter output was computed with (its manifest's resume_identity)."""
    known = {f.name for f in fields(cap.CaptionParams)}
    caption = cap.CaptionParams(**{k: v for k, v in identity["caption"].items() if k in known})
    image = ImageStageParams.from_dict(identity["image"]) if identity.get("image") else None
    return caption, image


def apply_changes(caption: cap.CaptionParams, image: ImageStageParams | None, changes: dict
                  ) -> tuple[cap.CaptionParams, ImageStageParams | None]:
    """New parameters with `changes` ({name: value}) applied, or NotRedecidable naming every change
    the evidence cannot support and why."""
    problems, cap_changes, text_changes, layout = [], {}, {}, {}
    current = {**asdict(caption), **(asdict(image.textspot) if image else {}),
               **({f.name: getattr(image, f.name) for f in fields(image) if f.name != "textspot"} if image else {})}
    for name, value in changes.items():
        if name in current and current[name] == value and name not in THRESHOLDS + LAYOUT + ACTIONS:
            continue  # a setting restated with the value it was computed with
        if name in CAPTION_THRESHOLDS:
            cap_changes[name] = value
        elif name in TEXT_THRESHOLDS or name in LAYOUT or name in ACTIONS:
            if image is None:
                problems.append(f"{name}: the source ran the caption rules only; no image was read")
            if name in ACTIONS and value not in TEXT_ACTIONS:
                raise ValueError(f"{name} {value!r}: one of {', '.join(TEXT_ACTIONS)}")
            (text_changes if name in TEXT_THRESHOLDS else layout)[name] = value
        elif name in {f.name for f in fields(cap.CaptionParams)} | {f.name for f in fields(ts.TextSpotParams)} \
                | {f.name for f in fields(ImageStageParams)}:
            problems.append(f"{name}: describes how the evidence was computed (parser, detector, recogniser or "
                            f"recording settings), not a decision threshold")
        else:
            raise ValueError(f"unknown parameter {name!r}; thresholds: {', '.join(THRESHOLDS + LAYOUT + ACTIONS)}")
    new_cap = replace(caption, **cap_changes)
    if new_cap.min_complexity < caption.min_complexity:
        problems.append(f"min_complexity {new_cap.min_complexity} < {caption.min_complexity}: captions below "
                        f"{caption.min_complexity} were dropped by the caption stage and never text-spotted")
    if caption.require_action and not new_cap.require_action:
        problems.append("require_action off: captions without an action were dropped by the caption stage, never "
                        "text-spotted (and, without a verb, not fully parsed)")
    if new_cap.max_caption_chars > caption.max_caption_chars:
        problems.append(f"max_caption_chars {new_cap.max_caption_chars} > {caption.max_caption_chars}: longer "
                        f"captions were never parsed")
    new_image = image
    if image is not None and not problems:
        min_chars = text_changes.get("min_chars", image.textspot.min_chars)
        if min_chars < image.read_min_chars:
            problems.append(f"min_chars {min_chars} < read_min_chars {image.read_min_chars}: boxes too narrow for "
                            f"{image.read_min_chars} characters were never read")
        else:
            new_image = replace(image, textspot=replace(image.textspot, **text_changes), **layout)
    if problems:
        raise NotRedecidable("the stored evidence cannot support: " + "; ".join(problems)
                             + ". Run the filter again (make filter) for these.")
    return new_cap, new_image


def evidence_summary(caption: cap.CaptionParams, image: ImageStageParams | None) -> dict:
    """What an output stores and which re-decisions it supports (written into manifest.json)."""
    out = {"captions": "captions/: every row with its parse and caption verdict",
           "ocr": "ocr/<part>.parquet: every detection (text, confidence) of every image read" if image else None,
           "redecidable": {"min_complexity": f">= {caption.min_complexity}",
                           "require_action": "on" if caption.require_action else "on or off",
                           "max_caption_chars": f"<= {caption.max_caption_chars}"},
           "fixed": "parser, detector and recogniser settings, read_min_chars, reread_below, max_pixels, download, input"}
    if image is not None:
        out["redecidable"].update(min_conf="any (every detection is stored)",
                                  min_chars=f">= {image.read_min_chars} (read_min_chars)",
                                  text_action="drop or mask (every detection is stored with its box)")
    return out


# ---------------------------------------------------------------- the caption stage, re-decided
def caption_verdict(row: dict, params: cap.CaptionParams) -> tuple[bool, str | None]:
    """The caption rules for a row the source parsed (passed, or dropped by a parse rule)."""
    reason = cap.precheck_caption(row["caption"], params)
    if reason is not None:
        return False, reason
    return cap.keep_caption(cap.CaptionParse.from_row(row), params.min_complexity, params.require_action)


def redecide_caption_part(src: str, into: str, part: str, params: cap.CaptionParams,
                          score: tuple[dict, list[dict]] | None = None, caption_rules: bool = True,
                          final: bool = True) -> dict:
    """INTO/captions/<part> and INTO/ledger/caption/<part> as a fresh caption stage with `params` writes
    them: rows whose verdict changed get a new ledger row, the others keep the source's, in row order.
    score (the part's input chunk dict, score_stage.Rule dicts): the score stage first, re-decided from
    the input's own score columns (INTO/ledger/score/<part>); caption_rules False: --stages without
    caption (rows go on unparsed; `final`: the part's rows go to no image stage, so they are kept here)."""
    rows = storage.read_parquet(storage.join(src, "captions", f"{part}.parquet"), schema=S.CAPTIONS.arrow).to_pylist()
    old_ledger = {r["key"]: r for r in storage.read_parquet(storage.join(src, "ledger", S.STAGE_CAPTION, f"{part}.parquet"),
                                                            schema=S.LEDGER.arrow).to_pylist()}
    ledger, score_ledger = [], []
    if score is not None:
        chunk = Chunk.from_dict(score[0])
        scored = score_stage.decide_part(chunk, [score_stage.Rule.from_dict(d) for d in score[1]])
    for r in rows:
        if score is not None and r["reason"] != S.R_READ_ERROR:
            verdict = scored.get(r["source_row"] - chunk.file_row_offset)
            if verdict is not None:   # dropped (or failed) by the score stage: never parsed in a fresh run
                r.update(dict.fromkeys(_PARSE), passed=False, reason=verdict["reason"])
                score_ledger.append(_ledger_row(r, verdict["status"], S.STAGE_SCORE, verdict["reason"],
                                                **{k: v for k, v in verdict.items() if k not in ("status", "reason")}))
                continue
            if r["reason"] in (S.R_SCORE_BELOW, S.R_SCORE_MISSING):
                if caption_rules:  # refused before (score_stage.check_redecidable): the row was never parsed
                    raise NotRedecidable(f"key {r['key']!r} passes the score stage now but was never parsed")
                r["passed"], r["reason"] = True, None
        if not caption_rules:  # nothing to re-decide here but the score stage
            if r["passed"] and final and score is not None:   # --stages score: kept by the score stage
                score_ledger.append(_ledger_row(r, S.KEPT, S.STAGE_SCORE, None))
            elif r["key"] in old_ledger:   # decided before any rule (unreadable), or an unfetchable URL
                ledger.append(old_ledger[r["key"]])
            continue
        before = (r["passed"], r["reason"])
        if r["passed"] or r["reason"] in PARSED_REASONS:
            r["passed"], r["reason"] = caption_verdict(r, params)
            if r["reason"] == S.R_TOO_LONG:  # settled before parsing in a fresh run: no parse
                r.update(dict.fromkeys(_PARSE))
        if (r["passed"], r["reason"]) != before:
            ledger.append(_ledger_row(r, S.DROPPED, S.STAGE_CAPTION, r["reason"]))
        elif r["key"] in old_ledger:
            ledger.append(old_ledger[r["key"]])
    atomic_write_parquet(S.CAPTIONS.from_rows(rows), storage.join(into, "captions", f"{part}.parquet"))
    atomic_write_parquet(S.LEDGER.from_rows(ledger), storage.join(into, "ledger", S.STAGE_CAPTION, f"{part}.parquet"))
    if score is not None:
        atomic_write_parquet(S.LEDGER.from_rows(score_ledger),
                             storage.join(into, "ledger", S.STAGE_SCORE, f"{part}.parquet"))
    counts = _count(score_ledger + ledger, len(rows), sum(bool(r["passed"]) for r in rows))
    write_marker(into, S.STAGE_CAPTION, part, counts)
    return counts


# ---------------------------------------------------------------- threshold sweep
def grid_points(caption: cap.CaptionParams, image: ImageStageParams | None, grid: dict[str, list]) -> list[dict]:
    """The cartesian product of `grid` ({threshold: values}); every point checked against the evidence."""
    names = list(grid)
    points = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
    for p in points:
        apply_changes(caption, image, p)
    return points


def count_outcomes(rows: Iterable[dict], points: list[dict], caption: cap.CaptionParams,
                   image: ImageStageParams | None) -> list[Counter]:
    """Per grid point, a Counter of (status, stage, reason) and of ("noise", noise, status) over `rows`:
    a source's captions rows joined with their ledger verdict (status, stage, reason), their
    caption verdict as c_passed / c_reason, detections (schemas.OCR) and an optional noise label.
    The same decisions a re-decision (and so a fresh run) makes, counted without writing anything."""
    params = [apply_changes(caption, image, p) for p in points]
    counts = [Counter() for _ in points]
    for row in rows:
        old = (row["status"], row["stage"], row["reason"])
        if old[0] is None:
            raise RuntimeError(f"key {row['key']!r} has no ledger row in the source output")
        parsed = row["c_passed"] or row["c_reason"] in PARSED_REASONS
        detections = detections_from_evidence(row.get("detections"))   # words with their boxes and lines
        verdicts, matches = {}, {}
        for i, (c, im) in enumerate(params):
            outcome = old
            if parsed:
                if c not in verdicts:
                    verdicts[c] = caption_verdict(row, c)
                passed, reason = verdicts[c]
                if not passed:
                    outcome = (S.DROPPED, S.STAGE_CAPTION, reason)
                elif old[1] == S.STAGE_TEXTSPOT and old[0] != S.FAILED:  # text-spotted: the rule on the detections
                    rule = (im.textspot.min_conf, im.textspot.min_chars, im.textspot.match_blocks)
                    if rule not in matches:
                        matches[rule] = ts.caption_match(detections, row["caption"], *rule) is not None
                    outcome = (S.KEPT, S.STAGE_TEXTSPOT, None)
                    if matches[rule]:   # masked when there are boxes to fill, as run_image_part decides
                        masked = im.text_action == "mask" and bool(mask.masked_detections(
                            detections, row["caption"], *rule))
                        outcome = (S.KEPT, S.STAGE_TEXTSPOT, S.R_TEXT_MASKED) if masked else \
                            (S.DROPPED, S.STAGE_TEXTSPOT, S.R_TEXT_SPOTTED)
            counts[i][outcome] += 1
            counts[i][("noise", row.get("noise"), outcome[0])] += 1
    return counts


def merge_counts(a: list[Counter], b: list[Counter]) -> list[Counter]:
    return [x + y for x, y in zip(a, b)]


def sweep_table(points: list[dict], counts: list[Counter]) -> list[dict]:
    """One row per grid point: the thresholds, counts per status and reason, keep rate, and where noise
    labels exist, per noise type the share removed (not kept) and, for clean pairs, the share lost."""
    reasons = sorted({k[2] for c in counts for k in c if k[0] != "noise" and k[2]})
    noises = sorted({k[1] for c in counts for k in c if k[0] == "noise" and k[1] is not None})
    table = []
    for p, c in zip(points, counts):
        n = {s: sum(v for k, v in c.items() if k[0] == s) for s in S.STATUSES}
        row = {**p, "n_input": sum(n.values()), "n_kept": n[S.KEPT], "n_dropped": n[S.DROPPED],
               "n_failed": n[S.FAILED], "keep_rate": round(n[S.KEPT] / max(1, sum(n.values())), 4)}
        for r in reasons:
            row[r] = sum(v for k, v in c.items() if k[0] != "noise" and k[2] == r)
        for t in noises:
            total = sum(v for k, v in c.items() if k[:2] == ("noise", t))
            lost = total - c[("noise", t, S.KEPT)]
            row[f"{t}_n"] = total
            row["clean_lost" if t == "none" else f"{t}_removed"] = round(lost / max(1, total), 4)
        table.append(row)
    return table


def plot_sweep(table: list[dict], grid: dict[str, list], path: str, title: str = "") -> str:
    """Keep rate (and, with noise labels, noise removed / clean pairs lost) against the grid's most
    varied threshold, one line per combination of the others."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varied = sorted(grid, key=lambda k: -len(grid[k]))
    x_name = "min_conf" if len(grid.get("min_conf", [])) > 1 else varied[0]
    others = [k for k in varied if k != x_name and len(grid[k]) > 1]
    metrics = ["keep_rate"] + sorted(k for k in table[0] if k.endswith("_removed")) + \
        (["clean_lost"] if "clean_lost" in table[0] else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    combos = sorted({tuple(r[k] for k in others) for r in table})
    colours = plt.cm.viridis([i / max(1, len(combos) - 1) for i in range(len(combos))])
    for ax, metric in zip(axes[0], metrics):
        for combo, colour in zip(combos, colours):
            rows = sorted((r for r in table if tuple(r[k] for k in others) == combo), key=lambda r: r[x_name])
            label = ", ".join(f"{k}={v}" for k, v in zip(others, combo)) or "all"
            ax.plot([r[x_name] for r in rows], [r[metric] for r in rows], marker="o", ms=3, color=colour, label=label)
        ax.set_xlabel(x_name)
        ax.set_title(metric.replace("_", " "))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    storage.write_bytes(path, png.getvalue())
    plt.close(fig)
    return path


def params_record(caption: cap.CaptionParams, image: ImageStageParams | None) -> dict:
    """The thresholds of a parameter set, for manifests and tables."""
    out = {k: getattr(caption, k) for k in CAPTION_THRESHOLDS}
    if image is not None:
        out.update({k: getattr(image.textspot, k) for k in TEXT_THRESHOLDS})
        if image.text_action != "drop":   # named only when not the default, as ImageStageParams.to_dict does
            out["text_action"] = image.text_action
    return out

