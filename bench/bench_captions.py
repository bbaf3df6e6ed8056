"""Caption parser benchmark: pipeline.captions.Parser against batched spaCy (what a spaCy user writes).

    PYTHONPATH=. .venv/bin/python bench/bench_captions.py [--rows 20000] [--ref-rows 5000] [--flickr-rows 5000]

Reference (PipeReference): the same rules (graph_from_doc) on nlp.pipe(texts, batch_size=256) with the
components the rules do not read disabled (ner, lemmatizer), every caption, no cache. Sets: the 1,000
LAION captions, the first --flickr-rows Flickr8k captions (../shared/data/flickr8k), and the web-like set
below. (ReferenceParser, one nlp(text) call per caption with the full pipeline, stays for the tests.)

Data: the 1,000 real LAION alt-texts (../shared/data/laion-sample/test_1000.parquet, TEXT), and a
web-like set of --rows rows built from them: a share --dup-rate of rows repeat an earlier row (picked
uniformly among earlier rows, which gives the heavy-tailed popularity of web captions; half of them
with whitespace changes), the rest are lightly perturbed, new variants of a real caption (stock-site
suffixes, prefixes, case, digits). The reference uses the same rules (graph_from_doc) on spaCy's full
pipeline, nlp(text), for every caption; its cost per caption does not depend on duplicates, so on the
big set it runs on a uniform random subset of --ref-rows rows (timing and agreement), to keep the
benchmark under ~5 minutes. BLAS threads are pinned to 1 and rates are given per CPU-second of the
process (robust when other jobs share the machine) as well as per wall-second.
Writes bench/results/captions.json.
"""
from __future__ import annotations

import os

if __name__ == "__main__":   # per-core figures: no hidden BLAS threads (only when run, not when tests import it)
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import argparse
import datetime
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.captions import (SPACY_MODEL, CaptionParams, Parser, get_nlp, graph_from_doc,  # noqa: E402
                               keep_caption, normalise)

SAMPLE = ROOT.parent / "shared" / "data" / "laion-sample" / "test_1000.parquet"
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k" / "captions.parquet"
RESULTS = ROOT / "bench" / "results" / "captions.json"


class ReferenceParser:
    """Obviously-correct baseline: full spaCy pipeline (ner, lemmatizer, everything), one caption per call,
    no cache, no shortcut; the same rules as the fast parser."""

    def __init__(self):
        import spacy
        self.nlp = spacy.load(SPACY_MODEL)

    def parse_one(self, text: str):
        return graph_from_doc(self.nlp(normalise(text)))

    def parse(self, texts: list[str]) -> list:
        return [self.parse_one(t) for t in texts]


class PipeReference:
    """Competent baseline: nlp.pipe(batch_size=256), ner and lemmatizer disabled, same rules."""

    def __init__(self, batch_size: int = 256):
        import spacy
        self.nlp, self.batch_size = spacy.load(SPACY_MODEL, disable=["ner", "lemmatizer"]), batch_size

    def parse(self, texts: list[str]) -> list:
        return [graph_from_doc(d) for d in self.nlp.pipe([normalise(t) for t in texts], batch_size=self.batch_size)]


def load_flickr_texts(n: int, path: Path = FLICKR) -> list[str]:
    import pyarrow.parquet as pq
    return pq.read_table(path, columns=["caption"]).column("caption").to_pylist()[:n]


def load_sample_texts(path: Path = SAMPLE) -> list[str]:
    import pyarrow.parquet as pq
    return [t for t in pq.read_table(path, columns=["TEXT"]).column("TEXT").to_pylist() if isinstance(t, str)]


_SUFFIXES = ["", "", "", " - Stock Photo", " | Etsy", " stock image", " for sale", " (Size {n})", " - Pack of {n}",
             " #{n}", " {n}", ", {n}", " - Royalty Free Image", " | eBay", " HD Wallpaper"]
_PREFIXES = ["", "", "", "", "Photo: ", "Free ", "New ", "Vintage ", "Image: "]


def _perturb(text: str, rng: random.Random) -> str:
    text = rng.choice(_PREFIXES) + text + rng.choice(_SUFFIXES).format(n=rng.randint(2, 999))
    case = rng.random()
    if case < 0.1:
        text = text.lower()
    elif case < 0.15:
        text = text.upper()
    elif case < 0.25:
        text = text.title()
    if rng.random() < 0.2:
        text = "".join(str(rng.randint(0, 9)) if ch.isdigit() else ch for ch in text)
    return text


def make_web_like(base: list[str], n_rows: int, dup_rate: float = 0.3, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    rows: list[str] = []
    seen: set[str] = set()
    for _ in range(n_rows):
        if rows and rng.random() < dup_rate:
            text = rng.choice(rows)
            if rng.random() < 0.5:
                text = "  " + text.replace(" ", "  ", 1) + " "   # same after normalisation
        else:
            text = _perturb(rng.choice(base), rng)
            while normalise(text) in seen:
                text = f"{text} {rng.randint(1000, 99999)}"
        seen.add(normalise(text))
        rows.append(text)
    return rows


def _timed(fn, *args):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - w0, time.process_time() - c0


def _verdict(parse, params: CaptionParams):
    return keep_caption(parse, params.min_complexity, params.require_action)


def compare(texts: list[str], reference: PipeReference, ref_idx: list[int], params: CaptionParams) -> dict:
    """Fast parser (cold cache) on all texts, reference on texts[ref_idx]; throughput + agreement."""
    parser = Parser(params)
    fast, fw, fc = _timed(parser.parse, texts)
    ref_texts = [texts[i] for i in ref_idx]
    ref, rw, rc = _timed(reference.parse, ref_texts)
    pairs = [(fast[i], r) for i, r in zip(ref_idx, ref)]
    agree = sum(_verdict(f, params) == _verdict(r, params) for f, r in pairs)
    full_rows = [(f, r) for f, r in pairs if f.complexity is not None]
    fast_rate, ref_rate = len(texts) / fc, len(ref_texts) / rc
    return {
        "rows": len(texts), "unique_normalised": len({normalise(t) for t in texts}),
        "reference_rows": len(ref_texts),
        "fast": {"captions_per_cpu_s": round(fast_rate, 1), "captions_per_wall_s": round(len(texts) / fw, 1),
                 "wall_s": round(fw, 2), "cpu_s": round(fc, 2), "routes": parser.stats.as_dict()},
        "reference": {"captions_per_cpu_s": round(ref_rate, 1), "captions_per_wall_s": round(len(ref_texts) / rw, 1),
                      "wall_s": round(rw, 2), "cpu_s": round(rc, 2)},
        "speedup_cpu": round(fast_rate / ref_rate, 2),
        "speedup_wall": round((len(texts) / fw) / (len(ref_texts) / rw), 2),
        "verdict_agreement": round(agree / len(pairs), 4),
        "fully_parsed_rows_identical": round(sum(f == r for f, r in full_rows) / max(1, len(full_rows)), 4),
        "keep_rate_fast": round(sum(_verdict(f, params)[0] for f, _ in pairs) / len(pairs), 4),
        "keep_rate_reference": round(sum(_verdict(r, params)[0] for r in ref) / len(ref), 4),
    }


def machine() -> dict:
    import spacy
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"cpu_model": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "spacy": spacy.__version__, "spacy_model": f"{SPACY_MODEL} {get_nlp().meta.get('version')}",
            "blas_threads": os.environ.get("OMP_NUM_THREADS"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--ref-rows", type=int, default=5_000)
    ap.add_argument("--flickr-rows", type=int, default=5_000)
    ap.add_argument("--dup-rate", type=float, default=0.3, help="share of rows repeating an earlier caption")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    base = load_sample_texts()
    params = CaptionParams()
    reference = PipeReference()
    Parser(params).parse(base[:50])               # load + warm both models outside the timings
    reference.parse(base[:50])

    results = {"benchmark": "captions", "machine": machine(), "params": params.__dict__,
               "dup_rate": args.dup_rate, "seed": args.seed}
    print(f"laion test_1000: {len(base)} captions")
    results["laion_test_1000"] = compare(base, reference, list(range(len(base))), params)
    flickr = load_flickr_texts(args.flickr_rows)
    print(f"flickr8k: {len(flickr)} captions")
    results["flickr8k"] = compare(flickr, reference, list(range(len(flickr))), params)
    web = make_web_like(base, args.rows, args.dup_rate, args.seed)
    ref_idx = sorted(random.Random(args.seed).sample(range(len(web)), min(args.ref_rows, len(web))))
    print(f"web-like: {len(web)} rows, reference on {len(ref_idx)}")
    results["web_like"] = compare(web, reference, ref_idx, params)
    complete = CaptionParams(complete_parses=True)
    _, w, c = _timed(Parser(complete).parse, web)
    results["web_like_complete_parses"] = {"captions_per_cpu_s": round(len(web) / c, 1),
                                           "captions_per_wall_s": round(len(web) / w, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    results["reference"] = "nlp.pipe(batch_size=256), ner + lemmatizer disabled, same rules (PipeReference)"
    for name in ("laion_test_1000", "flickr8k", "web_like"):
        r = results[name]
        print(f"{name}: fast {r['fast']['captions_per_cpu_s']}/cpu-s vs reference "
              f"{r['reference']['captions_per_cpu_s']}/cpu-s -> speedup {r['speedup_cpu']}x (wall {r['speedup_wall']}x), "
              f"verdict agreement {r['verdict_agreement']:.2%}")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
