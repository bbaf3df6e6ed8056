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
        for name in ("laion_test_1000", "flickr8k", "web_like"):
            s = r.get(name, {})
            if not s:
                continue
            out.append((f"caption parser, {name} ({s.get('rows')} rows)",
                        f"{_get(s, 'fast', 'captions_per_cpu_s')} captions/s per core vs batched nlp.pipe "
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
    r = _load("textspot")
    if r:
        for key, m in r.get("cpu", {}).items():
            best = m.get("best_reference")
            if not best:
                continue
            ours, ref = m["textspotter"], m[best]
            out.append((f"text spotting, CPU, Flickr8k {key.replace('_', ', ')} ({ours['n_images']} images, "
                        f"{ref['n_images']} for {best})",
                        f"{ours['cpu_s_per_image']} CPU s/image (P {ours['precision']}, R {ours['recall']}) vs "
                        f"{best} {ref['cpu_s_per_image']} (P {ref['precision']}, R {ref['recall']})",
                        f"{ours['speedup_cpu_vs_best_reference']}x"))
        web = r.get("web_size_set_textspotter")
        if web:
            out.append((f"text-spot drop verdict, {web['n_images']} web-size labelled pairs, gate 0.8",
                        f"precision {web['precision']}, recall {web['recall']}", ""))
        if _get(r, "gpu", default=None):
            out.append(("text spotting, GPU", json.dumps(r["gpu"])[:200], ""))
    r = _load("distill")
    if r:
        t = _get(r, "teacher_throughput", "cpu_1_thread", "end_to_end")
        st = r.get("labels_storage", {})
        out.append(("teacher embedding (EfficientNet-Lite0), CPU, 1 thread",
                    f"{_get(t, 'images_per_wall_s')} images/s end to end (decode + forward)", ""))
        out.append((f"labels, k={st.get('k')}", f"{st.get('sparse_bytes_per_sample')} bytes/sample sparse",
                    f"dense float32 {st.get('dense_float32_bytes_per_sample')} bytes ({st.get('n_objects')}+"
                    f"{st.get('n_attributes')} concepts)"))
    r = _load("train")
    if r:
        t, e = r.get("training", {}), r.get("retrieval_eval", {})
        out.append((f"training step, {t.get('model')}, batch {t.get('batch')}, CPU",
                    f"{t.get('ours_samples_per_s')} samples/s vs open_clip {t.get('open_clip_samples_per_s')}",
                    f"ratio {t.get('ratio')}"))
        out.append((f"retrieval eval {e.get('n_images')} x {e.get('n_captions')} (dim {e.get('dim')})",
                    f"{e.get('seconds')} s", f"+{e.get('peak_rss_growth_mb')} MB (full matrix: "
                    f"{e.get('full_matrix_would_be_mb')} MB)"))
    r = _load("cluster_check")
    if r:
        out.append(("standalone cluster (master + 2 workers) vs local[2]",
                    f"identical outputs: {r.get('identical')}", f"filter {r.get('cluster_filter_s')} s vs "
                    f"{r.get('local_filter_s')} s"))
    return out


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
