"""Measure re-deciding (local and Spark engine) against a fresh filter run, and sweep, on the Flickr8k web-noise set.

    PYTHONPATH=. .venv/bin/python bench/bench_redecide.py            # make bench runs it; ~15 min on 2 cores
    ... bench_redecide.py --input other/train.parquet --filters-only   # just the two filter runs (the slow part)

Without --input, the 7,500 noisy pairs (1,500 Flickr8k photos x 5 captions) are made once in --work by
experiments/webnoise.py, as for the evidence experiment.

The filter runs go through spark-submit (local[2]) as `make filter` runs them, --rows-per-part 1500
(6 parts: parts are whole row groups of 256). They take minutes, so each is timed once: its timing is
kept next to its output in --work and reused while that output is finished (delete the folder to time it again).
The re-decisions are timed every time, once per engine: the Spark engine through spark-submit as
`make redecide` runs it, the local engine as `python jobs/redecide.py --engine local` (no JVM), and,
to show what the JVM alone costs, the local engine under spark-submit too. Per job: wall seconds,
CPU seconds of the whole process tree (JVM + Python workers, sampled from /proc: robust to other jobs
sharing the machine), and the job's own clock (stats.json "seconds", without interpreter/JVM start).
Writes redecide.json, the sweep table (sweep.csv / sweep.json) and chart (sweep.png, local engine)
next to this file, and checks that every re-decided output equals the fresh run with the same
thresholds, and that the two engines' outputs and sweep tables are the same.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "redecide")
sys.path.insert(0, ROOT)

THRESHOLDS = ["--min-complexity", "2", "--min-conf", "0.7", "--min-chars", "4"]
SWEEP_GRID = ["--grid-min-complexity", "1,2,3", "--grid-min-conf", "0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95",
              "--grid-min-chars", "3,4,5,6,8"]
VENV = os.path.join(ROOT, ".venv", "bin")
ENV = {**os.environ, "PYTHONPATH": ROOT, "PYSPARK_PYTHON": os.path.join(VENV, "python"),
       "PYSPARK_DRIVER_PYTHON": os.path.join(VENV, "python"), "SPARK_LOCAL_IP": "127.0.0.1",
       "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


def submit(script: str, args: list[str]) -> dict:
    """The job through spark-submit local[2], as the Makefile runs it."""
    cmd = [os.path.join(VENV, "spark-submit"), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
           "--driver-java-options", f"-Dlog4j2.configurationFile={ROOT}/conf/log4j2.properties",
           os.path.join(ROOT, "jobs", script), *args]
    return {**timed(cmd), "command": " ".join(["spark-submit", f"jobs/{script}", *args])}


def plain_python(script: str, args: list[str]) -> dict:
    """The job as a plain Python process (the local engine needs no JVM)."""
    cmd = [os.path.join(VENV, "python"), os.path.join(ROOT, "jobs", script), *args]
    return {**timed(cmd), "command": " ".join(["python", f"jobs/{script}", *args])}


def timed(cmd: list[str]) -> dict:
    t = time.time()
    load = os.getloadavg()[0]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[int, float] = {}
    sampler = threading.Thread(target=_sample_tree_cpu, args=(proc, seen), daemon=True)
    sampler.start()
    out = proc.stdout.read()
    status = proc.wait()
    sampler.join()
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return {"wall_s": round(time.time() - t, 1), "cpu_s": round(sum(seen.values()), 1),
            "load_1min_at_start": round(load, 2), "load_1min_at_end": round(os.getloadavg()[0], 2)}


def _sample_tree_cpu(proc, seen: dict[int, float], every: float = 0.1) -> None:
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


def filter_once(work: str, name: str, args: list[str]) -> dict:
    """A filter run, timed once: reused while its output is finished and its timing is recorded."""
    out, timing = os.path.join(work, name), os.path.join(work, f"{name}.timing.json")
    if os.path.exists(timing) and _finished(out):
        with open(timing) as fh:
            return {**json.load(fh), "reused": True}
    shutil.rmtree(out, ignore_errors=True)  # a resumed partial run would time less than a whole one
    result = submit("cat_filter.py", [*args, "--output", out])
    result["job_s"] = job_seconds(out)
    with open(timing, "w") as fh:
        json.dump(result, fh, indent=2)
    return result


def _finished(out: str) -> bool:
    try:
        with open(os.path.join(out, "manifest.json")) as fh:
            return "finished" in json.load(fh)
    except OSError:
        return False


def fresh_into(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    return path


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
    counts = []
    for x in (a, b):
        with open(os.path.join(x, "stats.json")) as fh:
            s = json.load(fh)
        counts.append({k: s[k] for k in ("n_input", "n_kept", "n_dropped", "n_failed", "by_stage")})
    return {"ledger_rows": len(la), "same_keys": la.keys() == lb.keys(), "rows_differing": len(differ),
            "examples_differing": differ[:5], "same_shard_keys": keys[0] == keys[1], "n_shard_rows": len(keys[0]),
            "same_stats_counts": counts[0] == counts[1]}


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        gpu = None
    return {"cpu": model, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="experiments/webnoise.py's train.parquet (default: made in --work)")
    ap.add_argument("--work", default="/tmp/redecide_7500", help="scratch folder for the outputs")
    ap.add_argument("--rows-per-part", default="1500")
    ap.add_argument("--filters-only", action="store_true", help="run (or reuse) the two filter runs and stop")
    a = ap.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    if a.input is None:
        from experiments.webnoise import NoiseConfig, make_noisy_set
        noisy = os.path.join(a.work, "noisy")
        if not os.path.exists(os.path.join(noisy, "train.parquet")):
            make_noisy_set(noisy, NoiseConfig(photos=1500))
        a.input = os.path.join(noisy, "train.parquet")
    os.makedirs(RESULTS, exist_ok=True)
    result = {"machine": machine(), "input": a.input, "thresholds": " ".join(THRESHOLDS)}
    part = ["--input", a.input, "--rows-per-part", a.rows_per_part]
    result["source_filter"] = filter_once(a.work, "source", part)
    result["fresh_filter"] = filter_once(a.work, "fresh_c2", [*part, *THRESHOLDS])
    if a.filters_only:
        print(json.dumps(result, indent=2))
        return
    src, fresh = os.path.join(a.work, "source"), os.path.join(a.work, "fresh_c2")
    into = {e: os.path.join(a.work, f"redecided_c2_{e}") for e in ("local", "spark", "local_under_spark_submit")}
    result["redecide_local"] = plain_python("redecide.py", ["--source", src, "--into", fresh_into(into["local"]),
                                                            *THRESHOLDS, "--engine", "local"])
    result["redecide_spark"] = submit("redecide.py", ["--source", src, "--into", fresh_into(into["spark"]),
                                                      *THRESHOLDS, "--engine", "spark"])
    result["redecide_local_under_spark_submit"] = submit(
        "redecide.py", ["--source", src, "--into", fresh_into(into["local_under_spark_submit"]), *THRESHOLDS,
                        "--engine", "local"])
    for e, path in into.items():
        result[f"redecide_{e}"]["job_s"] = job_seconds(path)
        result[f"redecide_{e}"]["engine"] = "spark" if e == "spark" else "local"
    sweeps = {e: os.path.join(a.work, f"sweep_{e}") for e in ("local", "spark")}
    result["sweep_local"] = plain_python("redecide.py", ["--source", src, "--into", fresh_into(sweeps["local"]),
                                                         "--sweep", *SWEEP_GRID, "--engine", "local"])
    result["sweep_spark"] = submit("redecide.py", ["--source", src, "--into", fresh_into(sweeps["spark"]),
                                                   "--sweep", *SWEEP_GRID, "--engine", "spark"])
    tables = {}
    for e, path in sweeps.items():
        with open(os.path.join(path, "sweep.json")) as fh:
            tables[e] = json.load(fh)["points"]
        result[f"sweep_{e}"].update(points=len(tables[e]), engine=e)
    result["equal_to_fresh"] = {e: same_decisions(path, fresh) for e, path in into.items()}
    result["engines_agree"] = {"sweep_tables_equal": tables["local"] == tables["spark"],
                               "counts_add_up": all(r["n_input"] == r["n_kept"] + r["n_dropped"] + r["n_failed"]
                                                    for t in tables.values() for r in t),
                               "report_html_equal": _same_file(into["local"], into["spark"], "report.html")}
    f = result["fresh_filter"]
    result["speedup"] = {e: {k: round(f[k] / result[f"redecide_{e}"][k], 1) for k in ("wall_s", "cpu_s", "job_s")}
                         for e in into}
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    for name in ("sweep.csv", "sweep.json", "sweep.png"):
        shutil.copyfile(os.path.join(sweeps["local"], name), os.path.join(RESULTS, name))
    with open(os.path.join(RESULTS, "redecide.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))


def _same_file(a: str, b: str, name: str) -> bool:
    with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
        return fa.read() == fb.read()


if __name__ == "__main__":
    main()
