"""GPU executors on Spark: each task's models run on the GPU Spark assigned to it (pipeline.media.devices).

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_gpu_executors.py     # ~1.5 min on 2 cores

The cluster tests start a real standalone cluster on 127.0.0.1 (a master and one worker, with the
helpers of scripts/cluster_check.py) whose worker reports GPUs through tests/fake_gpu_discovery.sh,
and run tests/gpu_probe_job.py against it in a subprocess with its own SparkSession (the pytest
process may already hold one). Fake addresses test the assignment logic on any machine; CUDA itself
is used only where present.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch

from pipeline.media import devices
from scripts import cluster_check

ROOT = Path(__file__).resolve().parents[1]
DISCOVERY_SCRIPT = ROOT / "tests" / "fake_gpu_discovery.sh"
HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "no CUDA device on this machine: only the assignment logic is tested (fake GPU addresses)"


# ---------------------------------------------------------------- the mapping, without Spark
def test_addresses_map_to_cuda_ordinals():
    assert devices.cuda_device_for("0", {}) == "cuda:0"
    assert devices.cuda_device_for("3", {}) == "cuda:3"
    # CUDA_VISIBLE_DEVICES renumbers: torch's ordinal is the position of Spark's (physical) address
    assert devices.cuda_device_for("3", {"CUDA_VISIBLE_DEVICES": "2,3"}) == "cuda:1"
    assert devices.cuda_device_for("2", {"CUDA_VISIBLE_DEVICES": "2, 3"}) == "cuda:0"
    assert devices.cuda_device_for("1", {"CUDA_VISIBLE_DEVICES": "01"}) == "cuda:0"
    uuid = "GPU-8f6ba4c2-2f3b-11ee-be56-0242ac120002"
    assert devices.cuda_device_for(uuid, {"CUDA_VISIBLE_DEVICES": f"GPU-0000,{uuid}"}) == "cuda:1"
    with pytest.raises(devices.DeviceError, match="hides it"):
        devices.cuda_device_for("1", {"CUDA_VISIBLE_DEVICES": "0"})
    with pytest.raises(devices.DeviceError, match="hides it"):
        devices.cuda_device_for("0", {"CUDA_VISIBLE_DEVICES": ""})
    with pytest.raises(devices.DeviceError, match="not an index"):
        devices.cuda_device_for(uuid, {})


def test_outside_spark_the_choice_is_cuda_when_present_else_cpu():
    assert devices.spark_task_gpus() == []
    assert devices.select_device() == devices.select_device("auto") == ("cuda:0" if HAS_CUDA else "cpu")
    assert devices.select_device("cpu") == "cpu"
    assert devices.select_device("cuda:7") == "cuda:7"   # explicit devices are not second-guessed


# ---------------------------------------------------------------- a real standalone cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def standalone_cluster(work: Path, gpu_addresses: list[str], cores: int, env: dict | None = None):
    """A master and one worker on 127.0.0.1 whose GPUs are `gpu_addresses` (reported by the fake discovery
    script); yields the master URL. Ports are free ones: other runs of cluster_check may hold 7077."""
    work.mkdir(parents=True, exist_ok=True)
    script = work / "discover_gpus.sh"
    shutil.copy(DISCOVERY_SCRIPT, script)
    script.chmod(0o755)   # Spark executes it: do not depend on the checkout keeping the mode bit
    props = work / "worker.properties"   # no GPUs: an empty file (a worker with no resources)
    props.write_text(f"spark.worker.resource.gpu.amount {len(gpu_addresses)}\n"
                     f"spark.worker.resource.gpu.discoveryScript {script}\n" if gpu_addresses else "")
    port = _free_port()
    log = open(work / "cluster.log", "w")
    # the worker and its executors see every GPU under its own index: the addresses map to cuda:<address>
    worker_env = {"FAKE_GPU_ADDRESSES": ",".join(gpu_addresses), **(env or {})}
    with mock.patch.dict(cluster_check.ENV, worker_env):
        cluster_check.ENV.pop("CUDA_VISIBLE_DEVICES", None)
        procs = [cluster_check.spark_class("org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                           "--port", str(port), "--webui-port", str(_free_port()), log=log)]
        try:
            cluster_check.wait_port(port)
            procs.append(cluster_check.spark_class(
                "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}", "--cores", str(cores),
                "--memory", "2g", "--webui-port", str(_free_port()), "--work-dir", str(work / "worker"),
                "--properties-file", str(props), log=log))
            yield f"spark://127.0.0.1:{port}"
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                p.wait(timeout=60)
            log.close()


def run_probe(master: str, work: Path, *args: str) -> dict:
    out = work / "probe.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_probe_job.py"), master, str(out), *args],
                          env=cluster_check.ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"probe job failed:\n{proc.stderr[-4000:]}\ncluster log: {work / 'cluster.log'}"
    return json.loads(out.read_text())


def test_spark_tasks_share_fake_gpus_and_fall_back_without_them(tmp_path):
    with standalone_cluster(tmp_path, ["0", "1"], cores=4) as master:
        result = run_probe(master, tmp_path, "--tasks", "4", "--executor-gpus", "2", "--task-gpu", "0.5")

    gpu = result["gpu"]
    assert sorted(r["partition"] for r in gpu) == [0, 1, 2, 3]
    assert all(len(r["addresses"]) == 1 and r["addresses"][0] in ("0", "1") for r in gpu), gpu
    # 4 tasks at 0.5 GPU each ran at once (a barrier stage) on 2 GPUs: each GPU held by two of them
    assert Counter(r["addresses"][0] for r in gpu) == {"0": 2, "1": 2}
    assert len({r["pid"] for r in gpu}) == 4   # concurrent tasks, one Python worker each
    for r in gpu:
        address = r["addresses"][0]
        assert r["mapped"] == [f"cuda:{address}"]
        if not HAS_CUDA:   # a GPU was assigned but torch cannot use one: a clear error, never a silent CPU run
            assert "device" not in r and "sees no CUDA device" in r["error"], r
        elif int(address) < torch.cuda.device_count():
            assert r["device"] == f"cuda:{address}"
        else:              # a fake address beyond this machine's GPUs
            assert "device" not in r and "CUDA device(s)" in r["error"], r

    no_gpu = result["no_gpu"]
    assert len(no_gpu) == 4
    for r in no_gpu:
        assert r["addresses"] == [] and r["mapped"] == []
        assert r["device"] == ("cuda:0" if HAS_CUDA else "cpu")


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_teacher_and_text_spotter_run_on_the_assigned_gpu(tmp_path):
    addresses = [str(i) for i in range(torch.cuda.device_count())]
    tasks = 2 * len(addresses)
    with standalone_cluster(tmp_path, addresses, cores=tasks) as master:
        result = run_probe(master, tmp_path, "--tasks", str(tasks), "--executor-gpus", str(len(addresses)),
                           "--task-gpu", "0.5", "--load-models")
    for r in result["gpu"]:
        device = f"cuda:{r['addresses'][0]}"
        assert r["device"] == r["teacher_device"] == r["teacher_output_device"] == device, r
        assert r["spotter_device"] == r["recognizer_device"] == device, r
    assert Counter(r["addresses"][0] for r in result["gpu"]) == {a: 2 for a in addresses}
    for r in result["no_gpu"]:   # no GPU scheduled: the current CUDA device, still one model per device
        assert r["device"] == r["teacher_device"] == "cuda:0"
