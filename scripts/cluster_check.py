"""A real standalone Spark cluster on 127.0.0.1 runs the filter and distillation like local mode does.

    PYTHONPATH=. .venv/bin/python scripts/cluster_check.py      # ~10 min on 2 cores

Starts a master and two workers (1 core, 2 GB each) from pyspark's own jars (pip's pyspark has no
start-master.sh; spark-class runs the same classes), submits jobs/cat_filter.py and
jobs/distill_labels.py with --master spark://127.0.0.1:7077 on the embedded sample, runs the same
jobs in local mode, and asserts identical outputs (ledger rows, shard keys and bytes, stats, labels).
The trainer's multi-process path (torchrun, 2 CPU processes, gloo) is covered by
tests/test_train_loop.py, which compares its gradients with the single-process run.
Writes bench/results/cluster_check.json (the latest run is committed).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SPARK_HOME = Path(__import__("pyspark").__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYSPARK_PYTHON": sys.executable, "SPARK_HOME": str(SPARK_HOME),
       "SPARK_LOCAL_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


def wait_port(port, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def spark_class(*args, log):
    return subprocess.Popen([str(SPARK_HOME / "bin" / "spark-class"), *args], env=ENV, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def submit(master, job, *args):
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", master, "--conf", "spark.ui.enabled=false",
           "--conf", f"spark.executorEnv.PYTHONPATH={ROOT}",
           "--driver-java-options", f"-Dlog4j2.configurationFile={ROOT}/conf/log4j2.properties",
           str(ROOT / "jobs" / job), *args]
    t0 = time.time()
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{job} on {master} failed:\n{proc.stderr[-3000:]}")
    return round(time.time() - t0, 1)


def snapshot(filter_out, labels_out):
    ledger = pd.read_parquet(Path(filter_out) / "ledger").sort_values("key").reset_index(drop=True)
    ledger = ledger.drop(columns=["ocr_conf"]).assign(ocr_conf=pd.read_parquet(Path(filter_out) / "ledger")
                                                      .sort_values("key").ocr_conf.round(4).values)
    shards = pd.read_parquet(Path(filter_out) / "shards").sort_values("key").reset_index(drop=True)
    labels = pd.read_parquet(Path(labels_out) / "shards").sort_values("key").reset_index(drop=True)
    stats = json.loads((Path(filter_out) / "stats.json").read_text())
    stats.pop("seconds")
    stats.pop("phase_seconds")
    return ledger, shards, labels, stats


def main():
    from pipeline.filter.sample import make_sample
    work = Path(tempfile.mkdtemp(prefix="cluster_check_"))
    ENV["SPARK_WORKER_DIR"] = str(work / "worker")  # executors' scratch, not inside the venv
    sample = make_sample(str(work / "sample.parquet"))
    logs = open(work / "cluster.log", "w")
    procs = [spark_class("org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", "7077",
                         "--webui-port", "18080", log=logs)]
    result = {"check": "cluster", "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        wait_port(7077)
        for i in range(2):
            procs.append(spark_class("org.apache.spark.deploy.worker.Worker", "spark://127.0.0.1:7077", "--cores", "1",
                                     "--memory", "2g", "--webui-port", str(18081 + i), log=logs))
        time.sleep(8)
        master = "spark://127.0.0.1:7077"
        result["cluster_filter_s"] = submit(master, "cat_filter.py", "--input", sample, "--output",
                                            str(work / "c_filter"), "--rows-per-part", "32")
        result["cluster_distill_s"] = submit(master, "distill_labels.py", "--input", str(work / "c_filter"),
                                             "--output", str(work / "c_labels"), "--min-count", "2")
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
    result["local_filter_s"] = submit("local[2]", "cat_filter.py", "--input", sample, "--output",
                                      str(work / "l_filter"), "--rows-per-part", "32")
    result["local_distill_s"] = submit("local[2]", "distill_labels.py", "--input", str(work / "l_filter"),
                                       "--output", str(work / "l_labels"), "--min-count", "2")
    c = snapshot(work / "c_filter", work / "c_labels")
    loc = snapshot(work / "l_filter", work / "l_labels")
    cols = [x for x in c[0].columns if x != "source_file"]
    pd.testing.assert_frame_equal(c[0][cols], loc[0][cols])
    assert list(c[1].key) == list(loc[1].key) and (c[1].jpg == loc[1].jpg).all()
    pd.testing.assert_frame_equal(c[2], loc[2])
    assert c[3] == loc[3]
    result.update(identical=True, n_input=c[3]["n_input"], n_kept=c[3]["n_kept"], n_labels=len(c[2]))
    out = ROOT / "bench" / "results" / "cluster_check.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
