"""OUTPUT/report.html: one self-contained page to judge the CAT filter by.

    from pipeline.filter.report import write_report
    write_report("out/filter", stats, examples)   # -> out/filter/report.html

`stats` is the filter's stats.json: {"n_input", "n_kept", "n_dropped", "n_failed", "by_stage":
{stage: {"in": n, "kept": n, "dropped": {reason: n}, "failed": {reason: n}}}} (and "kept_by_reason":
{"text_masked": n} where --text-action mask kept rows with their text masked: a lighter green part of the
kept bar, a "kept" row of the table, and a section of original | masked pictures). `examples` maps a
reason to ledger rows (dicts with schemas.LEDGER columns: key, status, stage, reason, caption,
complexity, ocr_text, ocr_conf, matched_span, error_message) plus an optional "jpg" (bytes).
The page has a funnel (inline SVG: per stage, the rows in and how they split into kept and each
drop / failure reason), the counts as a table, and per reason a grid of thumbnails (base64 JPEG
data URIs) with the caption and the evidence; the OCR text that matched is <mark>ed in the caption.
Nothing is fetched: no external CSS, fonts, scripts or images. Every caption is HTML-escaped.
The funnel leaves out the download stage when no input needed downloading (stats["routes"]), and
no_pairs_reason(OUTPUT) says, as one line, why a finished filter run left nothing to label or train on.
Tests: PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_report.py
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

from schemas import FAILED, KEPT, R_TEXT_MASKED, STAGE_DOWNLOAD, STAGES
from pipeline.store import storage
from pipeline.media.images import ImageDecodeError, decode_image, to_jpeg

MAX_EXAMPLES = 12   # per reason: enough to see a pattern, small enough to keep the page light
THUMB_PX = 180      # thumbnail long side
KEPT_COLOUR, FAILED_COLOURS = "#4caf50", ("#c62828", "#e53935", "#ef5350", "#b71c1c")
KEPT_REASON_COLOUR = "#a5d6a7"   # kept with a reason (text_masked): a lighter green beside the plain kept
DROPPED_COLOURS = ("#ff9800", "#ffb74d", "#f57c00", "#ffcc80", "#e65100", "#ffa726")

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:2px solid #ddd;padding-bottom:4px}
.totals span{display:inline-block;margin:8px 16px 8px 0;font-size:18px}.totals b{font-size:24px}
.warn{background:#ffebee;border:1px solid #c62828;padding:8px;margin:8px 0}
table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
.grid.wide{grid-template-columns:repeat(auto-fill,minmax(400px,1fr))}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:13px;overflow-wrap:anywhere}
.card img{display:block;max-width:100%;max-height:180px;margin:0 auto 6px}
.noimg{height:90px;background:#eee;color:#777;display:flex;align-items:center;justify-content:center;margin-bottom:6px}
.caption{margin:4px 0}.evidence{color:#555}mark{background:#ffeb3b;padding:0 1px}
.legend span{display:inline-block;margin-right:14px;font-size:13px}.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
"""


def write_report(output_dir: str | Path, stats: dict, examples: dict[str, list[dict]] | None = None,
                 max_examples: int = MAX_EXAMPLES) -> Path | str:
    """Write output_dir/report.html (whole or not at all: storage.write_bytes) and return its path."""
    examples = examples or {}
    colours = _reason_colours(stats)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>CAT filter report</title>"
             f"<style>{CSS}</style></head><body><h1>CAT filter report</h1>", _totals(stats),
             "<h2>Funnel</h2>", _funnel_svg(stats, colours), _legend(colours, stats), _counts_table(stats)]
    for reason, rows in examples.items():
        shown = rows[:max_examples]
        note, wide = "", ""
        if reason == R_TEXT_MASKED:   # kept rows whose caption text was masked: the original beside the masked image
            note, wide = ("<p>Kept with the caption text the image shows masked (--text-action mask): each picture "
                          "is the original (left) beside the masked image the shards carry (right).</p>", " wide")
        parts.append(f"<h2 id='{_e(reason)}'>{_e(reason)} <small>({len(shown)} of {len(rows)} examples)</small></h2>"
                     f"{note}<div class='grid{wide}'>{''.join(_card(row) for row in shown)}</div>")
    parts.append("</body></html>")
    path = storage.join(str(output_dir), "report.html")
    storage.write_bytes(path, "\n".join(parts).encode("utf-8"))
    return path if storage.is_remote(path) else Path(path)


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def funnel_stages(stats: dict) -> list[str]:
    """The stages to show, in pipeline order. Download only when some input was downloaded or a row ended
    there (an input holding images whose row has none): otherwise inputs that hold their images pass
    straight from the caption stage to text spotting."""
    by_stage = stats.get("by_stage", {})
    shown = [s for s in STAGES if s in by_stage] + sorted(s for s in by_stage if s not in STAGES)
    def decided_rows(stage: str) -> int:
        st = by_stage[stage]
        return sum(st.get("dropped", {}).values()) + sum(st.get("failed", {}).values())
    if "routes" in stats and STAGE_DOWNLOAD not in stats["routes"]:   # shown still when a row ended there
        shown = [s for s in shown if s != STAGE_DOWNLOAD or decided_rows(s)]
    return shown


def no_pairs_reason(output: str | Path) -> tuple[str, str] | None:
    """(headline, detail) when a finished filter OUTPUT holds no kept pairs with images (it kept nothing,
    or it ran --stages caption); None otherwise, also when OUTPUT is not a finished filter output."""
    path = storage.join(str(output), "stats.json")
    if not storage.isfile(path):
        return None
    stats = storage.read_json(path)
    if stats.get("routes") == ["caption"]:
        return ("0 kept pairs with images", f"{output} was filtered with --stages caption: it holds captions "
                f"and their decisions, no images; run the filter with --stages auto for image-text pairs")
    if int(stats.get("n_kept", 0)) == 0:
        return ("0 kept pairs", f"the filter kept none of the {int(stats.get('n_input', 0)):,} input rows of "
                f"{output}: dropped {int(stats.get('n_dropped', 0)):,}, failed {int(stats.get('n_failed', 0)):,}; "
                f"the reasons are in {storage.join(str(output), 'report.html')}")
    return None


def _reason_colours(stats: dict) -> dict[tuple[str, str], str]:
    colours, n_drop, n_fail = {}, 0, 0
    for stage in funnel_stages(stats):
        for status, palette in (("dropped", DROPPED_COLOURS), ("failed", FAILED_COLOURS)):
            for reason in sorted(stats["by_stage"][stage].get(status, {})):
                if (status, reason) not in colours:
                    k = n_drop if status == "dropped" else n_fail
                    colours[(status, reason)] = palette[k % len(palette)]
                    n_drop, n_fail = n_drop + (status == "dropped"), n_fail + (status == "failed")
    return colours


def _totals(stats: dict) -> str:
    n_in, kept, dropped, failed = (int(stats.get(k, 0)) for k in ("n_input", "n_kept", "n_dropped", "n_failed"))
    pct = (lambda n: f" ({100 * n / n_in:.1f}%)") if n_in else (lambda n: "")
    out = (f"<div class='totals'><span>input <b>{n_in:,}</b></span><span>kept <b>{kept:,}</b>{pct(kept)}</span>"
           f"<span>dropped <b>{dropped:,}</b>{pct(dropped)}</span><span>failed <b>{failed:,}</b>{pct(failed)}</span></div>")
    if n_in != kept + dropped + failed:  # the ledger invariant; make a broken run visible, not hidden
        out += (f"<div class='warn'>Accounting mismatch: n_input {n_in:,} != kept + dropped + failed "
                f"{kept + dropped + failed:,}</div>")
    return out


def _funnel_svg(stats: dict, colours: dict) -> str:
    """One horizontal bar per stage, as wide as the rows that entered it (relative to n_input),
    split into kept / dropped-by-reason / failed-by-reason segments."""
    stages = funnel_stages(stats)
    width, label_w, bar_h, gap = 1000, 110, 34, 14
    scale_n = max([int(stats.get("n_input", 0))] + [int(stats["by_stage"][s].get("in", 0)) for s in stages] + [1])
    bar_w = width - label_w - 90  # room for the "in N" label after the longest bar
    height = len(stages) * (bar_h + gap) + gap
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
           f"aria-label='filter funnel' style='font:13px sans-serif'>"]
    for row, stage in enumerate(stages):
        s, y = stats["by_stage"][stage], gap + row * (bar_h + gap)
        out.append(f"<text x='0' y='{y + bar_h / 2 + 5}'>{_e(stage)}</text>")
        kept_by = {r: int(n) for r, n in sorted(s.get("kept_by_reason", {}).items())}
        segments = [("kept", "kept", int(s.get("kept", 0)) - sum(kept_by.values()), KEPT_COLOUR)]
        segments += [("kept", reason, n, KEPT_REASON_COLOUR) for reason, n in kept_by.items()]
        for status in ("dropped", "failed"):
            for reason, n in sorted(s.get(status, {}).items()):
                segments.append((status, reason, int(n), colours[(status, reason)]))
        x = float(label_w)
        for status, reason, n, colour in segments:
            w = bar_w * n / scale_n
            if n <= 0:
                continue
            out.append(f"<rect x='{x:.1f}' y='{y}' width='{max(w, 1):.1f}' height='{bar_h}' fill='{colour}'>"
                       f"<title>{_e(stage)} {_e(status)} {_e(reason)}: {n:,}</title></rect>")
            if w > 60:
                out.append(f"<text x='{x + 4:.1f}' y='{y + bar_h / 2 + 5}' fill='#000'>{n:,}</text>")
            x += w
        out.append(f"<text x='{x + 6:.1f}' y='{y + bar_h / 2 + 5}' fill='#333'>"
                   f"in {int(s.get('in', 0)):,}</text>")
    out.append("</svg>")
    return "".join(out)


def _legend(colours: dict, stats: dict | None = None) -> str:
    items = [f"<span><i style='background:{KEPT_COLOUR}'></i>kept</span>"]
    kept_reasons = sorted({r for st in (stats or {}).get("by_stage", {}).values() for r in st.get("kept_by_reason", {})})
    items += [f"<span><i style='background:{KEPT_REASON_COLOUR}'></i>kept: {_e(r)}</span>" for r in kept_reasons]
    items += [f"<span><i style='background:{c}'></i>{_e(status)}: {_e(reason)}</span>"
              for (status, reason), c in colours.items()]
    return f"<div class='legend'>{''.join(items)}</div>"


def stage_passed(st: dict) -> int:
    """Rows that left a stage towards the next one (after the last stage: kept). Outputs written before
    stats.json had "passed" derive it from in - dropped - failed."""
    if "passed" in st:
        return int(st["passed"])
    return int(st.get("in", 0)) - sum(st.get("dropped", {}).values()) - sum(st.get("failed", {}).values())


def _counts_table(stats: dict) -> str:
    rows = ["<table><tr><th>stage</th><th>in</th><th>passed</th><th>status</th><th>reason</th><th>rows</th></tr>"]
    for stage in funnel_stages(stats):
        s = stats["by_stage"][stage]
        reasons = [(st, r, n) for st in ("kept_by_reason", "dropped", "failed") for r, n in sorted(s.get(st, {}).items())]
        reasons = [("kept" if st == "kept_by_reason" else st, r, n) for st, r, n in reasons] or [("", "", "")]
        for i, (status, reason, n) in enumerate(reasons):
            head = (f"<td>{_e(stage)}</td><td>{int(s.get('in', 0)):,}</td><td>{stage_passed(s):,}</td>"
                    if i == 0 else "<td></td><td></td><td></td>")
            link = f"<a href='#{_e(reason)}'>{_e(reason)}</a>" if reason else ""
            rows.append(f"<tr>{head}<td>{_e(status)}</td><td>{link}</td><td>{'' if n == '' else f'{n:,}'}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _thumbnail(jpg, width: int = THUMB_PX) -> str:
    if not jpg:
        return "<div class='noimg'>no image</div>"
    try:
        img = decode_image(jpg).image
    except ImageDecodeError as err:
        return f"<div class='noimg'>undecodable: {_e(str(err)[:80])}</div>"
    img.thumbnail((width, THUMB_PX))
    data = base64.b64encode(to_jpeg(img, quality=80)).decode("ascii")
    return f"<img alt='thumbnail' src='data:image/jpeg;base64,{data}'>"


def highlight(caption: str | None, span: str | None) -> str:
    """HTML-escaped caption with the first occurrence of `span` (case-insensitive) in <mark>."""
    caption = caption or ""
    start = caption.lower().find(span.lower()) if span else -1
    if start < 0:
        return _e(caption)
    end = start + len(span)
    return f"{_e(caption[:start])}<mark>{_e(caption[start:end])}</mark>{_e(caption[end:])}"


def _card(row: dict) -> str:
    evidence = [f"{_e(row.get('status'))} at {_e(row.get('stage'))}"]
    if row.get("complexity") is not None:
        evidence.append(f"complexity C{_e(row['complexity'])}")
    if row.get("score_column"):   # the score stage: column, value, threshold
        value = "missing" if row.get("score") is None else f"{float(row['score']):.4g}"
        limit = "" if row.get("score_threshold") is None else f" (threshold {float(row['score_threshold']):.4g})"
        evidence.append(f"{_e(row['score_column'])} = {_e(value)}{_e(limit)}")
    if row.get("ocr_text"):
        conf = f" (conf {float(row['ocr_conf']):.2f})" if row.get("ocr_conf") is not None else ""
        evidence.append(f"OCR: \u201c{_e(row['ocr_text'])}\u201d{conf}")
    if row.get("matched_span"):
        evidence.append(f"matched: <mark>{_e(row['matched_span'])}</mark>")
    if row.get("masked"):   # text_masked: the words whose boxes were filled
        words = [w.asDict() if hasattr(w, "asDict") else w for w in row["masked"]]   # Spark Rows or dicts
        boxes = "; ".join(f"{_e(w['text'])} [{w['x0']:.0f},{w['y0']:.0f},{w['x1']:.0f},{w['y1']:.0f}]"
                          for w in words if w.get("x0") is not None)
        evidence.append(f"masked {len(words)} word{'s' if len(words) != 1 else ''}: {boxes}")
    if row.get("error_message"):
        evidence.append(f"error: {_e(row['error_message'])}")
    evidence.append(f"key {_e(row.get('key'))}")
    colour = "#c62828" if row.get("status") == FAILED else ("#2e7d32" if row.get("status") == KEPT else "#ef6c00")
    width = 2 * THUMB_PX + 4 if row.get("reason") == R_TEXT_MASKED else THUMB_PX   # original | masked
    return (f"<div class='card' style='border-top:4px solid {colour}'>{_thumbnail(row.get('jpg'), width)}"
            f"<div class='caption'>{highlight(row.get('caption'), row.get('matched_span'))}</div>"
            f"<div class='evidence'>{'<br>'.join(evidence)}</div></div>")
