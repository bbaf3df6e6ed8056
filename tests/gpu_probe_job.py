"""A tiny Spark job that reports, per task, the GPUs Spark assigned and the device pipeline.media.devices chose.

    PYTHONPATH=. .venv/bin/python tests/gpu_probe_job.py spark://127.0.0.1:7077 OUT.json \
        [--tasks 4] [--executor-gpus 2] [--task-gpu 0.5] [--load-models]

Run by tests/test_gpu_executors.py in a subprocess (its own SparkSession, never a second one in the
pytest process) against a standalone cluster whose worker reports GPUs through
tests/fake_gpu_discovery.sh. Writes OUT.json: {"gpu": [row per task], "no_gpu": [row per task]}.
  gpu     --tasks tasks, each asking for --task-gpu of a GPU, as one barrier stage: Spark runs a
          barrier stage only when all its tasks fit at once, and every task waits at the barrier for
          the others, so the rows are the addresses of tasks that ran concurrently;
  no_gpu  the same tasks under a task resource profile that asks for no GPU (stage-level scheduling
          on the same executors): the fallback when Spark schedules no GPU.
--load-models (for machines with CUDA): each GPU task also takes the distillation teacher and the
text spotter from their per-device caches, runs each once, and reports where their weights are.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def probe_task(load_models: bool):
    def run(_rows):
        from pyspark import BarrierTaskContext, TaskContext

        from pipeline.media import devices
        context = TaskContext.get()
        if isinstance(context, BarrierTaskContext):
            context.barrier()   # every task of the stage holds its GPU share now
        row = {"partition": context.partitionId(), "pid": os.getpid(), "addresses": devices.spark_task_gpus()}
        try:
            row["mapped"] = [devices.cuda_device_for(a) for a in row["addresses"]]
            row["device"] = devices.select_device()
        except devices.DeviceError as e:
            row["error"] = str(e)
        if load_models and row.get("device"):
            row.update(_load_models(row["device"]))
        yield row
    return run


def _load_models(device: str) -> dict:
    import numpy as np
    import torch

    from pipeline.distill.teacher import cached_teacher
    from pipeline.filter.spotting import get_spotter
    from pipeline.filter.textspot import TextSpotParams
    teacher = cached_teacher("efficientnet-lite0")
    spotter = get_spotter(TextSpotParams())
    size = teacher.preprocess.image_size
    embedding = teacher.forward(torch.zeros(1, 3, size, size, device=teacher.device))
    spotter.spot([np.zeros((64, 64, 3), np.uint8)])
    return {"teacher_device": str(next(teacher.model.parameters()).device), "teacher_output_device": str(embedding.device),
            "teacher_id": id(teacher), "spotter_device": str(next(spotter.detector.parameters()).device),
            "recognizer_device": str(next(spotter.reader.recognizer.parameters()).device), "spotter_id": id(spotter)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("master")
    ap.add_argument("out")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--executor-gpus", type=int, default=2)
    ap.add_argument("--task-gpu", default="0.5")
    ap.add_argument("--load-models", action="store_true")
    a = ap.parse_args(argv)
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests
    from pyspark.sql import SparkSession
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spark = (SparkSession.builder.master(a.master).appName("gpu-probe")
             .config("spark.ui.enabled", "false")
             .config("spark.executorEnv.PYTHONPATH", root)
             .config("spark.executor.resource.gpu.amount", str(a.executor_gpus))
             .config("spark.task.resource.gpu.amount", a.task_gpu)
             # a barrier stage with more tasks than fit at once is retried for 10 min by default: fail in ~10 s
             .config("spark.scheduler.barrier.maxConcurrentTasksCheck.maxFailures", "2")
             .config("spark.scheduler.barrier.maxConcurrentTasksCheck.interval", "5s")
             .getOrCreate())
    sc = spark.sparkContext
    sc.setLogLevel("WARN")
    try:
        sc.parallelize([0], 1).count()   # waits for the executor, so the barrier stage's slot check sees it
        run = probe_task(a.load_models)
        result = {"gpu": sc.parallelize(range(a.tasks), a.tasks).barrier().mapPartitions(run).collect()}
        cpu_only = ResourceProfileBuilder().require(TaskResourceRequests().cpus(1)).build
        result["no_gpu"] = sc.parallelize(range(a.tasks), a.tasks).withResources(cpu_only).mapPartitions(run).collect()
    finally:
        spark.stop()
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
