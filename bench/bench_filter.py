"""Whole-job benchmark of the CAT filter's caption stage under spark-submit, and its memory bound.

    PYTHONPATH=. .venv/bin/python bench/bench_filter.py [--rows 100000] [--million-rows 1000000]

1. Throughput: the web-like caption set of bench_captions (real LAION alt-texts, realistic repeats)
   through `spark-submit --master local[2] jobs/cat_filter.py --stages caption`, captions/s of the job
   (its own clock, excluding JVM start-up, and the wall clock of the whole command) against the
   reference implementation (spaCy's full pipeline on every caption, one core) in the same run; the
   reference's per-core rate is doubled for the comparison (local[2] has two cores).
2. Bounded memory: a generated 1,000,000-row metadata input through the same job with the driver
   capped at 1 GiB (--driver-memory 1g); peak resident memory of the driver JVM and of the whole
   process tree, sampled from /proc every 0.2 s.
Writes bench/results/filter.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_captions import ReferenceParser, load_sample_texts, machine, make_web_like  # noqa: E402
from pipeline.captions import CaptionParams, keep_caption  # noqa: E402


def submit(inp, out, *extra, driver_memory=None):
    cmd = [os.path.join(os.path.dirname(sys.executable), "spark-submit"), "--master", "local[2]",
           "--conf", "spark.ui.enabled=false",
           "--driver-java-options", f"-Dlog4j2.configurationFile={ROOT}/conf/log4j2.properties"]
    if driver_memory:
        cmd += ["--driver-memory", driver_memory]
    cmd += [str(ROOT / "jobs" / "cat_filter.py"), "--input", str(inp), "--output", str(out), "--stages", "caption", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYSPARK_PYTHON": sys.executable}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    peak_tree, peak_driver = 0, 0
    while proc.poll() is None:
        tree = _tree_rss(proc.pid)
        peak_tree = max(peak_tree, sum(tree.values()))
        peak_driver = max([peak_driver] + [rss for (name, rss) in tree.items() if "java" in name[1]])
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(stderr[-3000:])
    stats = json.load(open(Path(out) / "stats.json"))
    return {"wall_s": round(time.time() - t0, 1), "job_s": stats["seconds"], "n_input": stats["n_input"],
            "n_kept": stats["n_kept"], "phase_seconds": stats.get("phase_seconds"), "peak_rss_tree_mb": round(peak_tree / 2**20),
            "peak_rss_driver_jvm_mb": round(peak_driver / 2**20)}


def _tree_rss(root: int) -> dict:
    """{(pid, comm): rss bytes} for root and its descendants."""
    children: dict[int, list[int]] = {}
    info = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                parts = fh.read().rsplit(")", 1)
            comm = parts[0].split("(", 1)[1]
            ppid = int(parts[1].split()[1])
            rss = int(parts[1].split()[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(pid))
        info[int(pid)] = (comm, rss)
    out, todo = {}, [root]
    while todo:
        p = todo.pop()
        if p in info:
            out[(p, info[p][0])] = info[p][1]
        todo.extend(children.get(p, []))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--ref-rows", type=int, default=2_000)
    ap.add_argument("--million-rows", type=int, default=1_000_000, help="0 skips the memory run")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_filter_"))
    result = {"benchmark": "filter", "machine": machine()}

    texts = make_web_like(load_sample_texts(), a.rows, seed=0)
    inp = work / "web"
    inp.mkdir()
    pq.write_table(pa.table({"URL": [f"http://img.example/{i}.jpg" for i in range(len(texts))], "TEXT": texts}),
                   inp / "captions.parquet", row_group_size=2_500)
    job = submit(inp, work / "out_web", "--rows-per-part", "2500")
    rng = random.Random(0)
    idx = rng.sample(range(len(texts)), min(a.ref_rows, len(texts)))
    ref = ReferenceParser()
    c0, w0 = time.process_time(), time.perf_counter()
    ref_parses = ref.parse([texts[i] for i in idx])
    ref_cpu, ref_wall = time.process_time() - c0, time.perf_counter() - w0
    ref_per_core = len(idx) / ref_cpu
    import pandas as pd
    captions = pd.read_parquet(work / "out_web" / "captions", columns=["source_row", "passed"]).set_index("source_row")
    params = CaptionParams()
    agree = sum(bool(captions.loc[i, "passed"]) == keep_caption(p, params.min_complexity, params.require_action)[0]
                for i, p in zip(idx, ref_parses))
    result["throughput"] = {
        "rows": len(texts), "spark_job": job,
        "job_captions_per_s": round(len(texts) / job["job_s"], 1),
        "caption_stage_captions_per_s": round(len(texts) / job["phase_seconds"]["caption"], 1),
        "command_captions_per_s_incl_jvm_start": round(len(texts) / job["wall_s"], 1),
        "reference_captions_per_cpu_s_one_core": round(ref_per_core, 1),
        "reference_rows": len(idx), "reference_wall_s": round(ref_wall, 1),
        "speedup_job_vs_reference_process": round((len(texts) / job["job_s"]) / ref_per_core, 2),
        "speedup_job_vs_reference_on_2_cores": round((len(texts) / job["job_s"]) / (2 * ref_per_core), 2),
        "verdict_agreement_with_reference": round(agree / len(idx), 4),
    }
    print(json.dumps(result["throughput"], indent=2))

    if a.million_rows:
        base = pq.read_table(ROOT.parent / "shared" / "data" / "laion-sample" / "test_1000.parquet", columns=["URL", "TEXT"])
        big = work / "million"
        big.mkdir()
        import pyarrow.compute as pc
        reps = a.million_rows // base.num_rows
        with pq.ParquetWriter(big / "part-0.parquet", base.schema) as w:
            for r in range(reps):
                w.write_table(pa.table({"URL": pc.binary_join_element_wise(base.column("URL"), pa.scalar(f"?copy={r}"), ""),
                                        "TEXT": base.column("TEXT")}))
        mem = submit(big, work / "out_million", "--rows-per-part", "50000", driver_memory="1g")
        mem["driver_memory"] = "1g"
        result["bounded_memory"] = mem
        print(json.dumps(mem, indent=2))

    out = ROOT / "bench" / "results" / "filter.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
