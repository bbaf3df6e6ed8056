"""Measure `make redecide` against a fresh filter run, and sweep, on the Flickr8k web-noise set.

    python -m experiments.webnoise --out /tmp/redecide_bench/noisy --photos 200    # 1,000 noisy pairs
    PYTHONPATH=. .venv/bin/python bench/results/redecide/measure.py --input /tmp/redecide_bench/noisy/train.parquet

Every job goes through spark-submit (local[2]) as `make filter` / `make redecide` run it, with the
same rows per part (2 parts: both cores busy). Per job: wall seconds, CPU seconds of the whole
process tree (JVM + Python workers, sampled from /proc: robust to other jobs sharing the machine)
and the job's own clock (stats.json "seconds", without the JVM start). Writes redecide.json, the
sweep table (sweep.csv / sweep.json) and chart (sweep.png) next to this file, and checks that the
re-decided output equals the fresh run with the same thresholds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, ROOT)

THRESHOLDS = ["--min-complexity", "2", "--min-conf", "0.7", "--min-chars", "4"]


def submit(script: str, args: list[str]) -> dict:
    venv = os.path.join(ROOT, ".venv", "bin")
    cmd = [os.path.join(venv, "spark-submit"), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
           "--driver-java-options", f"-Dlog4j2.configurationFile={ROOT}/conf/log4j2.properties",
           os.path.join(ROOT, "jobs", script), *args]
    env = {**os.environ, "PYTHONPATH": ROOT, "PYSPARK_PYTHON": os.path.join(venv, "python"),
           "PYSPARK_DRIVER_PYTHON": os.path.join(venv, "python"), "SPARK_LOCAL_IP": "127.0.0.1",
           "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    t = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[int, float] = {}
    sampler = threading.Thread(target=_sample_tree_cpu, args=(proc, seen), daemon=True)
    sampler.start()
    out = proc.stdout.read()
    status = proc.wait()
    sampler.join()
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return {"wall_s": round(time.time() - t, 1), "cpu_s": round(sum(seen.values()), 1),
            "command": " ".join([f"jobs/{script}", *args])}


def _sample_tree_cpu(proc, seen: dict[int, float], every: float = 0.2) -> None:
    """CPU seconds (user + system) of every process below `proc` (JVM, Spark's Python daemon and its
    workers), sampled from /proc: the workers are not waited for by their parents, so wait4's rusage
    misses them. A process that exits between samples loses at most `every` seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    while proc.poll() is None:
        parent, cpu = {}, {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(pid)] = int(fields[1])
            cpu[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
        for pid, c in cpu.items():
            p = pid
            while p in parent and p != proc.pid and p > 1:
                p = parent[p]
            if p == proc.pid:
                seen[pid] = max(seen.get(pid, 0.0), c)
        time.sleep(every)


def job_seconds(out: str) -> float:
    with open(os.path.join(out, "stats.json")) as fh:
        return json.load(fh)["seconds"]


def same_decisions(a: str, b: str) -> dict:
    import pyarrow.parquet as pq
    import schemas as S
    la = {r["key"]: r for r in pq.read_table(f"{a}/ledger", schema=S.LEDGER.arrow).to_pylist()}
    lb = {r["key"]: r for r in pq.read_table(f"{b}/ledger", schema=S.LEDGER.arrow).to_pylist()}
    differ = [k for k in la if (la[k]["status"], la[k]["stage"], la[k]["reason"]) !=
              (lb.get(k, {}).get("status"), lb.get(k, {}).get("stage"), lb.get(k, {}).get("reason"))]
    keys = [sorted(pq.read_table(f"{x}/shards", columns=["key"]).column(0).to_pylist()) for x in (a, b)]
    return {"ledger_rows": len(la), "same_keys": la.keys() == lb.keys(), "rows_differing": len(differ),
            "examples_differing": differ[:5], "same_shard_keys": keys[0] == keys[1], "n_shard_rows": len(keys[0])}


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        gpu = None
    return {"cpu": model, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="experiments/webnoise.py's train.parquet")
    ap.add_argument("--work", default="/tmp/redecide_bench/runs", help="scratch folder for the outputs")
    ap.add_argument("--rows-per-part", default="500")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    result = {"machine": machine(), "input": a.input, "thresholds": " ".join(THRESHOLDS)}
    src, fresh, red, sw = (os.path.join(a.work, n) for n in ("source", "fresh_c2", "redecided_c2", "sweep"))
    part = ["--rows-per-part", a.rows_per_part]
    result["source_filter"] = submit("cat_filter.py", ["--input", a.input, "--output", src, *part])
    result["source_filter"]["job_s"] = job_seconds(src)
    result["fresh_filter"] = submit("cat_filter.py", ["--input", a.input, "--output", fresh, *part, *THRESHOLDS])
    result["fresh_filter"]["job_s"] = job_seconds(fresh)
    result["redecide"] = submit("redecide.py", ["--source", src, "--into", red, *THRESHOLDS])
    result["redecide"]["job_s"] = job_seconds(red)
    result["sweep"] = submit("redecide.py", ["--source", src, "--into", sw, "--sweep", "--grid-min-complexity", "1,2,3",
                                             "--grid-min-conf", "0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95",
                                             "--grid-min-chars", "3,4,5,6,8"])
    result["equal_to_fresh"] = same_decisions(red, fresh)
    f, r = result["fresh_filter"], result["redecide"]
    result["speedup"] = {k: round(f[k] / r[k], 1) for k in ("wall_s", "cpu_s", "job_s")}
    with open(os.path.join(sw, "sweep.json")) as fh:
        result["sweep"]["points"] = len(json.load(fh)["points"])
    for name in ("sweep.csv", "sweep.json", "sweep.png"):
        with open(os.path.join(sw, name), "rb") as fi, open(os.path.join(HERE, name), "wb") as fo:
            fo.write(fi.read())
    with open(os.path.join(HERE, "redecide.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
