"""Collects the headline figures of bench/results/*.json into bench/results/SUMMARY.md (run by `make bench`).

    PYTHONPATH=. .venv/bin/python -m bench.summary
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _get(d, *path, default="n/a"):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def rows() -> list[tuple[str, str, str]]:
    out = []
    r = _load("captions")
    if r:
        for name in ("laion_test_1000", "web_like"):
            s = r.get(name, {})
            out.append((f"caption parser, {name} ({s.get('rows')} rows)",
                        f"{_get(s, 'fast', 'captions_per_cpu_s')} captions/s per core vs reference "
                        f"{_get(s, 'reference', 'captions_per_cpu_s')}",
                        f"{s.get('speedup_cpu')}x, verdict agreement {s.get('verdict_agreement')}"))
    r = _load("filter")
    if r:
        t = r.get("throughput", {})
        out.append((f"filter job, caption stage, spark-submit local[2] ({t.get('rows')} rows)",
                    f"{t.get('job_captions_per_s')} captions/s (job clock; {t.get('command_captions_per_s_incl_jvm_start')}"
                    f" incl. JVM start) vs reference {t.get('reference_captions_per_cpu_s_one_core')}/s per core",
                    f"{t.get('speedup_job_vs_reference_process')}x the reference process, "
                    f"{t.get('speedup_job_vs_reference_on_2_cores')}x of 2 reference cores, agreement "
                    f"{t.get('verdict_agreement_with_reference')}"))
        m = r.get("bounded_memory")
        if m:
            out.append((f"filter job, {m['n_input']:,} rows, --driver-memory {m['driver_memory']}",
                        f"peak RSS driver JVM {m['peak_rss_driver_jvm_mb']} MB, whole tree {m['peak_rss_tree_mb']} MB",
                        f"{m['job_s']} s job time, no OOM"))
    for name in ("textspot", "distill", "train", "ablate", "cluster_check"):
        r = _load(name)
        if r:
            out.append((name, _headline(name, r), ""))
    return out


def _headline(name, r) -> str:
    keys = {"textspot": ["speedup", "fast", "naive"], "distill": ["teacher", "labels"],
            "train": ["ratio", "ours", "open_clip", "retrieval_eval"], "cluster_check": ["identical", "n_input"]}
    picked = {k: v for k, v in r.items() if any(s in k for s in keys.get(name, []))}
    return json.dumps(picked or {k: v for k, v in r.items() if k != "machine"}, default=str)[:400]


def _load(name):
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def main():
    lines = ["| benchmark | figure | versus |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows()]
    text = "\n".join(lines) + "\n"
    (RESULTS / "SUMMARY.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
