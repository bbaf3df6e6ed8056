"""Which torch device a model runs on: the GPU Spark assigned to the task, else CUDA when present, else CPU.

    from pipeline.media.devices import select_device
    select_device()          # in a Spark task given GPU address "1": "cuda:1"; else "cuda:0" when torch
                             #   sees CUDA; else "cpu"
    select_device("cuda")    # a GPU: the task's assigned one on a GPU cluster, else the current CUDA device
    select_device("cpu")     # any other explicit device is used as given
    cuda_device_for("3", {"CUDA_VISIBLE_DEVICES": "2,3"})   # -> "cuda:1"

The text-spot stage (pipeline.filter.textspot) and the distillation teacher (pipeline.distill.teacher) both choose
through select_device and cache one model per Python worker per device string: a Python worker that
Spark reuses for tasks on different GPUs holds one model per GPU, and tasks that share a GPU
(fractional spark.task.resource.gpu.amount) and a worker share its model.

Spark's side (README "Running on a cluster"): with spark.executor.resource.gpu.amount and
spark.task.resource.gpu.amount set, each task finds its addresses in
TaskContext.get().resources()["gpu"]; a task amount of 0.25 lets four tasks hold the same address at
once. A task given several addresses (task amount >= 2) runs its model on the first one.

Addresses are whatever the discovery script printed. Spark's getGpusResources.sh prints nvidia-smi's
indices, i.e. physical GPU indices, while torch numbers only the GPUs this process can see:
  * CUDA_VISIBLE_DEVICES unset: address N is cuda:N;
  * CUDA_VISIBLE_DEVICES set (GPU isolation on YARN, a user's export, a container runtime): the
    address is looked up in that list and its position is torch's ordinal - address "3" with
    CUDA_VISIBLE_DEVICES=2,3 is cuda:1. Entries match as text (UUIDs "GPU-..." work when the
    discovery script prints UUIDs) or as equal integers;
  * an address missing from a set CUDA_VISIBLE_DEVICES, or beyond torch's device count, or a task
    given a GPU by a torch without CUDA: DeviceError, rather than silently computing on the CPU or
    on another task's GPU.

Importable without Spark or torch (both are imported inside the functions).
Tests: PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_gpu_executors.py
"""
from __future__ import annotations

import os
from typing import Mapping

AUTO = "auto"   # also what None means: choose as described above


class DeviceError(RuntimeError):
    """Spark assigned a GPU this process cannot use."""


def spark_task_gpus() -> list[str]:
    """GPU addresses Spark assigned to the running task; [] outside a Spark task or when the task
    was scheduled without GPU resources."""
    try:
        from pyspark import TaskContext
    except ImportError:   # pipeline/ runs without Spark too (tests, notebooks, the trainer)
        return []
    context = TaskContext.get()
    if context is None:   # the driver, or a plain Python process
        return []
    gpu = context.resources().get("gpu")
    return list(gpu.addresses) if gpu is not None else []


def cuda_device_for(address: str, environ: Mapping[str, str] = os.environ) -> str:
    """torch's device string for the GPU that Spark calls `address` (see the module docstring)."""
    address = str(address).strip()
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        if not address.isdigit():
            raise DeviceError(f"GPU address {address!r} is not an index and CUDA_VISIBLE_DEVICES is unset, so "
                              "it cannot be mapped to a torch device; make the discovery script print indices")
        return f"cuda:{int(address)}"
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    for ordinal, entry in enumerate(entries):
        if entry == address or (entry.isdigit() and address.isdigit() and int(entry) == int(address)):
            return f"cuda:{ordinal}"
    raise DeviceError(f"Spark assigned GPU {address!r} to this task but CUDA_VISIBLE_DEVICES={visible!r} hides it "
                      "from this process; the discovery script and the executor's CUDA_VISIBLE_DEVICES must "
                      "name GPUs the same way")


def select_device(requested: str | None = None) -> str:
    """The torch device string a model should use in this process, for this task.

    None or "auto": the Spark task's GPU, else "cuda:<current>" when torch sees CUDA, else "cpu".
    "cuda": the Spark task's GPU when it has one (so `--device cuda` on a GPU cluster still gives each
    task its own GPU), else the current CUDA device. Anything else ("cpu", "cuda:1", "mps") as given."""
    if requested not in (None, AUTO, "cuda"):
        return requested
    addresses = spark_task_gpus()
    if addresses:
        device = cuda_device_for(addresses[0])
        _check_usable(device, addresses[0])
        return device
    import torch
    if torch.cuda.is_available():
        # an explicit index, so that "cuda" and "cuda:0" do not cache two copies of a model
        return f"cuda:{torch.cuda.current_device()}"
    return "cuda" if requested == "cuda" else "cpu"   # "cuda" without CUDA: torch's own error, where it is used


def _check_usable(device: str, address: str) -> None:
    import torch
    if not torch.cuda.is_available():
        raise DeviceError(f"Spark assigned GPU {address!r} to this task but torch {torch.__version__} sees no "
                          "CUDA device (a CPU build of torch, or no driver); install a CUDA build of torch on "
                          "the executors, or submit without spark.task.resource.gpu.amount to run on CPUs")
    ordinal, count = int(device.split(":")[1]), torch.cuda.device_count()
    if ordinal >= count:
        raise DeviceError(f"Spark assigned GPU {address!r} to this task ({device}) but this process sees "
                          f"{count} CUDA device(s); check the discovery script and CUDA_VISIBLE_DEVICES")
