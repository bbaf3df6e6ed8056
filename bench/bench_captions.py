"""Caption parser benchmark: pipeline.filter.captions.Parser against batched spaCy (what a spaCy user writes).

    PYTHONPATH=. .venv/bin/python bench/bench_captions.py [--rounds 5] [--flickr-rows 5000] [--rows 20000]

Reference (PipeReference): the same rules (graph_from_doc) on nlp.pipe(texts, batch_size=256) with the
components the rules do not read disabled (ner, lemmatizer), every caption, no cache, spaCy as installed
(thinc on blis). Per core: BLAS threads pinned to 1, CPU time of the process (time.process_time, robust
when other jobs share the machine); wall time is recorded too.

Sets, each of UNIQUE normalised captions (so no cache can help) with a cold parser per round: the 1,000
real LAION alt-texts (../shared/data/laion-sample/test_1000.parquet) and the first --flickr-rows
Flickr8k captions (../shared/data/flickr8k/captions.parquet). Parser and reference alternate for
--rounds rounds and the median CPU time of each gives the speed-up (the machine's load changes while
it runs: the load averages are recorded). Next to every speed figure: agreement of the keep verdict
and of the stored concepts with the reference (see `agreement`). An ablation runs the reference with
the parser's numpy-BLAS thinc ops, to show what part of the gain is the matrix product alone.

The web-like set (--rows rows built from the LAION captions: a share --dup-rate repeats an earlier
row, the rest are lightly perturbed variants: stock-site suffixes, prefixes, case, digits) measures
the cache on repeated captions; the reference runs on a uniform random subset of --ref-rows rows.

Writes bench/results/captions.json and bench/results/captions_profile.txt (CPU seconds per step of
both pipelines on both sets, and a cProfile of the parser on Flickr8k).
"""
from __future__ import annotations

import os

if __name__ == "__main__":   # per-core figures: no hidden BLAS threads (only when run, not when tests import it)
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import argparse
import cProfile
import datetime
import io
import json
import platform
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.filter.captions import (SPACY_MODEL, CaptionParams, Parser, _numpy_blas_ops, get_nlp,  # noqa: E402
                               graph_from_doc, keep_caption, normalise, use_numpy_blas)

SAMPLE = ROOT.parent / "shared" / "data" / "laion-sample" / "test_1000.parquet"
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k" / "captions.parquet"
RESULTS = ROOT / "bench" / "results" / "captions.json"
PROFILE = ROOT / "bench" / "results" / "captions_profile.txt"


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
    """Competent baseline: nlp.pipe(batch_size=256), ner and lemmatizer disabled, same rules.
    numpy_blas=True (ablation only): thinc's matrix products on the parser's numpy-BLAS ops."""

    def __init__(self, batch_size: int = 256, numpy_blas: bool = False):
        import spacy
        self.nlp, self.batch_size = spacy.load(SPACY_MODEL, disable=["ner", "lemmatizer"]), batch_size
        if numpy_blas:
            use_numpy_blas(self.nlp)

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


def _concepts(parse):
    return parse.objects, parse.attributes


def agreement(fast: list, ref: list, params: CaptionParams) -> dict:
    """Fast parses against the reference's, row by row.

    verdict_agreement: same keep verdict (and drop reason). The stored parse feeds concept distillation
    (objects + attributes of KEPT rows) and re-deciding (verdicts from stored parses):
    concepts_identical_kept / parses_identical_kept: rows the reference keeps, concepts / whole parse equal;
    parses_identical_where_computed: rows the fast parser fully parsed (complexity not None), parse equal;
    objects_identical: every row; concepts_identical_all_rows: every row, where rows that cannot hold an
    action store no attributes by design (rows_without_attributes of them), so this counts them as
    different whenever the reference found attributes."""
    pairs = list(zip(fast, ref))
    kept = [(f, r) for f, r in pairs if _verdict(r, params)[0]]
    computed = [(f, r) for f, r in pairs if f.complexity is not None]

    def share(rows, same):
        return round(sum(same(f, r) for f, r in rows) / len(rows), 4) if rows else None

    return {
        "verdict_agreement": share(pairs, lambda f, r: _verdict(f, params) == _verdict(r, params)),
        "keep_rate_fast": round(sum(_verdict(f, params)[0] for f in fast) / len(fast), 4),
        "keep_rate_reference": round(len(kept) / len(ref), 4),
        "concepts_identical_kept": share(kept, lambda f, r: _concepts(f) == _concepts(r)),
        "parses_identical_kept": share(kept, lambda f, r: f == r),
        "parses_identical_where_computed": share(computed, lambda f, r: f == r),
        "objects_identical": share(pairs, lambda f, r: f.objects == r.objects),
        "concepts_identical_all_rows": share(pairs, lambda f, r: _concepts(f) == _concepts(r)),
        "rows_without_attributes": len(pairs) - len(computed),
    }


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def compare(texts: list[str], references: dict, params: CaptionParams, rounds: int,
            ref_idx: list[int] | None = None, with_complete_parses: bool = False) -> dict:
    """Alternate a cold Parser on all texts and each reference on texts[ref_idx] (default all) for `rounds`
    rounds; median CPU times give the rates; agreement against references['reference'].
    with_complete_parses: also time Parser(complete_parses=True), which stores every row's full graph."""
    ref_idx = list(range(len(texts))) if ref_idx is None else ref_idx
    ref_texts = [texts[i] for i in ref_idx]
    runs = {"fast": [], "complete_parses": [], **{name: [] for name in references}}
    complete_params = CaptionParams(**{**params.__dict__, "complete_parses": True})
    load_before = os.getloadavg()
    for _ in range(rounds):
        parser = Parser(params)
        fast, wall, cpu = _timed(parser.parse, texts)
        runs["fast"].append((wall, cpu))
        if with_complete_parses:
            complete, wall, cpu = _timed(Parser(complete_params).parse, texts)
            runs["complete_parses"].append((wall, cpu))
        for name, reference in references.items():
            out, wall, cpu = _timed(reference.parse, ref_texts)
            runs[name].append((wall, cpu))
            if name == "reference":
                ref = out
    median = {name: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r))
              for name, r in runs.items() if r}
    fast_rate = len(texts) / median["fast"][1]
    result = {
        "rows": len(texts), "unique_normalised": len({normalise(t) for t in texts}), "reference_rows": len(ref_texts),
        "rounds": rounds, "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "fast": {"captions_per_cpu_s": _rate(len(texts), median["fast"][1]),
                 "captions_per_wall_s": _rate(len(texts), median["fast"][0]),
                 "cpu_s_per_round": [round(c, 3) for _, c in runs["fast"]], "routes": parser.stats.as_dict()},
    }
    for name in references:
        rate = len(ref_texts) / median[name][1]
        result[name] = {"captions_per_cpu_s": _rate(len(ref_texts), median[name][1]),
                        "captions_per_wall_s": _rate(len(ref_texts), median[name][0]),
                        "cpu_s_per_round": [round(c, 3) for _, c in runs[name]],
                        "speedup_cpu": round(fast_rate / rate, 2)}
    result["speedup_cpu"] = result["reference"]["speedup_cpu"]
    result["speedup_wall"] = round((len(texts) / median["fast"][0]) / (len(ref_texts) / median["reference"][0]), 2)
    result.update(agreement([fast[i] for i in ref_idx], ref, params))
    if with_complete_parses:
        ref_rate = len(ref_texts) / median["reference"][1]
        same = agreement([complete[i] for i in ref_idx], ref, params)
        result["complete_parses"] = {
            "captions_per_cpu_s": _rate(len(texts), median["complete_parses"][1]),
            "cpu_s_per_round": [round(c, 3) for _, c in runs["complete_parses"]],
            "speedup_cpu": round(len(texts) / median["complete_parses"][1] / ref_rate, 2),
            **{k: same[k] for k in ("verdict_agreement", "concepts_identical_all_rows", "parses_identical_where_computed")}}
    return result


def step_profile(texts: list[str], reference: PipeReference, params: CaptionParams, repeats: int = 3) -> dict:
    """CPU seconds per step, the least of `repeats` runs (a garbage collection or another job's burst
    lands in whichever step runs then): the parser's own counters, the reference's components one by one."""
    runs = []
    for _ in range(repeats):
        parser = Parser(params)
        parser.parse(texts)
        s = parser.stats
        fast = {"tokenizer + tok2vec + tagger": s.cpu_tagging, "which docs may hold a verb": s.cpu_verb_check,
                f"parser ({s.n_parsed} of {s.n_parsed + s.n_tagger_only} docs)": s.cpu_parsing,
                "tag -> POS (PosRules)": s.cpu_pos, "rules": s.cpu_rules}
        ref, clock = {}, time.process_time()
        docs = list(reference.nlp.tokenizer.pipe(texts))
        ref["tokenizer"] = time.process_time() - clock
        for name, component in reference.nlp.pipeline:
            clock = time.process_time()
            docs = list(component.pipe(docs, batch_size=reference.batch_size))
            ref[name] = time.process_time() - clock
        clock = time.process_time()
        [graph_from_doc(d) for d in docs]
        ref["rules"] = time.process_time() - clock
        runs.append({"parser": fast, "reference": ref})
    return {side: {k: round(min(run[side][k] for run in runs), 3) for k in runs[0][side]} for side in runs[0]}


def write_profile(path: Path, sets: dict, reference: PipeReference, params: CaptionParams, load: list) -> dict:
    lines = ["Caption parser (pipeline/filter/captions.py) vs the reference (batched nlp.pipe, ner + lemmatizer off),",
             "unique captions, cold cache, 1 BLAS thread, CPU seconds (time.process_time), least of 3 runs per step;",
             f"load average {load}.",
             "Written by bench/bench_captions.py.", ""]
    steps = {}
    for name, texts in sets.items():
        steps[name] = step_profile(texts, reference, params)
        for side, parts in steps[name].items():
            total = sum(parts.values())
            lines.append(f"{name} ({len(texts)} captions), {side}: {total:.3f} s")
            lines += [f"    {k:<34} {v:7.3f} s  {v / total:5.1%}" for k, v in parts.items()]
        lines.append("")
    flickr = sets["flickr8k"]
    profiler = cProfile.Profile()
    profiler.enable()
    Parser(params).parse(flickr)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    lines += [f"cProfile of Parser.parse on the {len(flickr)} Flickr8k captions (by own time; the dependency",
              "parser's transition loop is compiled code without profiling hooks: it shows in no row)",
              out.getvalue()]
    path.write_text("\n".join(lines) + "\n")
    return steps


def machine() -> dict:
    import spacy
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    return {"cpu_model": cpu, "cores": os.cpu_count(), "avx512f": "avx512f" in flags, "python": platform.python_version(),
            "spacy": spacy.__version__, "spacy_model": f"{SPACY_MODEL} {get_nlp().meta.get('version')}",
            "blas_threads": os.environ.get("OMP_NUM_THREADS"), "numpy_blas_ops": _numpy_blas_ops() is not None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per set; medians are reported")
    ap.add_argument("--flickr-rows", type=int, default=5_000)
    ap.add_argument("--rows", type=int, default=20_000, help="rows of the web-like set")
    ap.add_argument("--ref-rows", type=int, default=5_000, help="reference rows on the web-like set")
    ap.add_argument("--dup-rate", type=float, default=0.3, help="share of web-like rows repeating an earlier row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--profile-out", type=Path, default=PROFILE)
    args = ap.parse_args(argv)

    base = load_sample_texts()
    sets = {"laion_test_1000": list(dict.fromkeys(normalise(t) for t in base)),
            "flickr8k": list(dict.fromkeys(normalise(t) for t in load_flickr_texts(args.flickr_rows)))}
    params = CaptionParams()
    references = {"reference": PipeReference(), "reference_numpy_blas": PipeReference(numpy_blas=True)}
    Parser(params).parse(base[:50])               # load + warm every model outside the timings
    for reference in references.values():
        reference.parse(base[:50])

    results = {"benchmark": "captions", "machine": machine(), "params": params.__dict__,
               "reference": "nlp.pipe(batch_size=256), ner + lemmatizer disabled, same rules (PipeReference)",
               "reference_numpy_blas": "ablation: the reference with thinc's matrix products on numpy's OpenBLAS",
               "rounds": args.rounds, "dup_rate": args.dup_rate, "seed": args.seed}
    for name, texts in sets.items():
        print(f"{name}: {len(texts)} unique captions, {args.rounds} rounds")
        results[name] = compare(texts, references, params, args.rounds, with_complete_parses=True)
    web = make_web_like(base, args.rows, args.dup_rate, args.seed)
    ref_idx = sorted(random.Random(args.seed).sample(range(len(web)), min(args.ref_rows, len(web))))
    print(f"web-like: {len(web)} rows, reference on {len(ref_idx)}")
    results["web_like"] = compare(web, {"reference": references["reference"]}, params, 1, ref_idx)
    _, w, c = _timed(Parser(CaptionParams(complete_parses=True)).parse, web)
    results["web_like_complete_parses"] = {"captions_per_cpu_s": _rate(len(web), c), "captions_per_wall_s": _rate(len(web), w)}
    results["steps_cpu_s"] = write_profile(args.profile_out, sets, references["reference"], params,
                                           [round(x, 2) for x in os.getloadavg()])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name in ("laion_test_1000", "flickr8k", "web_like"):
        r = results[name]
        print(f"{name}: fast {r['fast']['captions_per_cpu_s']}/cpu-s vs reference "
              f"{r['reference']['captions_per_cpu_s']}/cpu-s -> {r['speedup_cpu']}x (wall {r['speedup_wall']}x); "
              f"verdict agreement {r['verdict_agreement']:.2%}, concepts of kept rows identical "
              f"{r['concepts_identical_kept']:.2%}, all rows {r['concepts_identical_all_rows']:.2%}; "
              f"load {r['load_average_1_5_15_after']}")
    print(f"wrote {args.out} and {args.profile_out}")
    return results


if __name__ == "__main__":
    main()
