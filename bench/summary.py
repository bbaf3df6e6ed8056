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
        w = r.get("whole_job")
        if w:
            job, acc = w["spark_job"], w["accuracy"]
            ocr = w["ocr_reference"]
            q, ref = acc["job_all_spotted_rows"], acc[f"{ocr}_rule_sampled_rows"]
            out.append((f"whole filter job ({w['engine']}), spark-submit local[2], Flickr8k web-noise "
                        f"({w['rows']:,} rows, {w['distinct_images_spotted']:,} images spotted)",
                         f"{w['job_cpu_s_per_input_row']} CPU s/row ({job['cpu_s_tree']} CPU s, {job['wall_s']} s wall, "
                         f"load {job['load_1min_during']['mean']}) vs plain baselines summed "
                         f"{w['baseline_cpu_s_per_input_row']} (nlp.pipe + {ocr} + decode)",
                         f"{w['speedup_cpu_job_vs_baselines_sum']}x; text-spot drop P {q['precision']} R {q['recall']} "
                         f"({ocr} + rule P {ref['precision']} R {ref['recall']} on {ref['rows']} sampled rows), "
                         f"verdict agreement {acc['drop_verdict_agreement_job_vs_reference_rule']}"))
            cpu = w["phases"]["cpu_s"]
            out.append(("whole filter job, CPU s by phase", ", ".join(f"{k} {v}" for k, v in cpu.items()),
                        f"text spotting {w['job_textspot_stage_cpu_s_per_spotted_image']} CPU s/image vs {ocr} "
                        f"+ decode {w['baseline_ocr_plus_decode_cpu_s_per_spotted_image']}"))
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
        for name in ("real_256", "rendered_256"):   # bench_textspot since issue 26: engines x sets
            paths = r.get("cpu", {}).get(name, {})
            if paths:
                out.append((f"text spotting, CPU, 1 thread, {name} ({r.get('sets', {}).get(name, {}).get('n')} images)",
                            "; ".join(f"{p} {m['cpu_s_per_image']} CPU s/image (P {m['precision']}, R {m['recall']})"
                                      for p, m in paths.items() if not p.endswith("_recording")),
                            f"default engine: {r.get('default_engine')}"))
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
    r = _load("cost")
    if r:
        for dataset, p in r.get("projections", {}).items():
            gpu = [h if isinstance(h, str) else f"{h:,} GPU-h" for h in (p["textspot_gpu_hours"], p["teacher_gpu_hours"])]
            out.append((f"cost model, {dataset} ({p['rows']:,} rows; bench/results/cost.md)",
                        f"CPU: caption job {p['caption_job_core_hours']:,} core-h, text spotting "
                        f"{p['textspot_core_hours']:,} core-h, teacher {p['teacher_core_hours']:,} core-h; GPU: "
                        f"text spotting {gpu[0]}, teacher {gpu[1]}",
                        f"downloads {p['download_tb_saved']} TB smaller (caption stage first)"))
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
