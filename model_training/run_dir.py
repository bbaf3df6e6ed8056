"""The run folder of model_training.train: its identity, checkpoints, temporaries and full-disk errors.

    identity = run_identity(cfg, shards)              # config that shapes training + data fingerprint
    prepare_run_dir(run_dir, identity, cfg, rank)     # refuse another run (differences named), or resume / overwrite
    save_checkpoint(run_dir, state, meta, keep)       # rotation by step, never by file name
    find_checkpoint(run_dir, "latest")

A RUN folder holds one run: RUN/run.json records its identity; a different configuration or other
data is refused with the differences named (--overwrite clears only what train writes). Checkpoints
are ordered by the step in their meta, writes go through temporaries, and a full disk is one
pipeline.partitions.StorageError with the temporary removed.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from model_training.models import export_open_clip
from pipeline.partitions import atomic_write_json, dict_differences, writing

RUN_MANIFEST = "run.json"
# settings that do not change what is trained: they may differ between a run and its resume. The data
# enters the identity as a fingerprint of its files, not as paths (a moved folder holds the same data).
NOT_IDENTITY = ("shards", "labels", "run_dir", "resume", "overwrite", "stop_after", "log_every",
                "checkpoint_every", "keep_checkpoints", "compile", "device")
# what train and train_eval write into RUN: --overwrite removes these and nothing else (RUN may be ".")
RUN_OUTPUTS = ("checkpoints", "tensorboard", "export", "log.csv", "loss_curve.png", "train_summary.json",
               "metrics.json", "recall.png", RUN_MANIFEST)


class RunFolderError(ValueError):
    """RUN holds another run, or a checkpoint was written with another configuration."""


def _files_fingerprint(paths) -> str:
    """Names and sizes: stat only (no data read, fine for 100k shards) and enough to tell re-filtered data apart."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(f"{p.name}|{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def run_identity(cfg, shards: list[Path]) -> dict:
    """What makes two runs the same run: the settings that shape the trajectory + the data's fingerprint."""
    labels = "none"
    if cfg.labels:
        files = [*(Path(cfg.labels) / "shards").glob("*.parquet"), Path(cfg.labels) / "vocab.json"]
        labels = _files_fingerprint(p for p in files if p.is_file())
    identity = {"config": {k: v for k, v in asdict(cfg).items() if k not in NOT_IDENTITY},
                "data": {"shards": _files_fingerprint(shards), "n_shards": len(shards), "labels": labels}}
    return json.loads(json.dumps(identity, default=str))   # as it reads back from JSON


def identity_differences(recorded: dict, now: dict) -> list[str]:
    """'setting: old -> new' per difference. A setting the recorded run did not have (added to TrainConfig
    since) is not a difference."""
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in dict_differences(recorded, now) if a is not None]


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, .pt path) of the complete checkpoints (the .json meta is written after the .pt), oldest first,
    ordered by the step in the meta (else in the name), never by name: step_10000000 sorts before step_9999999."""
    found = []
    for meta in (run_dir / "checkpoints").glob("step_*.json"):
        try:
            step = int(json.loads(meta.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            digits = re.fullmatch(r"step_(\d+)", meta.stem)
            if digits is None:
                continue
            step = int(digits.group(1))
        found.append((step, meta.with_suffix(".pt")))
    return sorted(found)


def find_checkpoint(run_dir: Path, spec: str) -> Path | None:
    """'latest' -> the checkpoint with the highest step; anything else is a path."""
    if spec != "latest":
        return Path(spec)
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def delete_checkpoint(pt: Path):
    pt.with_suffix(".json").unlink(missing_ok=True)   # first: without its meta the .pt already counts as incomplete
    pt.unlink(missing_ok=True)


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested state: about what its checkpoint needs on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


@contextmanager
def torch_writing(path: Path, tmp: Path, needed_bytes: int):
    """pipeline.partitions.writing for torch.save: torch reports a failed write as an opaque RuntimeError
    ("unexpected pos", "basic_ios::clear"); when the disk then lacks the bytes needed, it was a full disk."""
    with writing(str(path), str(tmp), needed_bytes):
        try:
            yield
        except RuntimeError as e:
            tmp.unlink(missing_ok=True)
            if shutil.disk_usage(path.parent).free >= needed_bytes:
                raise
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e


def save_checkpoint(run_dir: Path, state: dict, meta: dict, keep: int) -> Path:
    """step_NNNNNNN.pt via a temporary, then its .json meta; keeps the `keep` highest steps (0 = all).
    A full disk raises pipeline.partitions.StorageError with the temporary removed."""
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{state['step']:07d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    with torch_writing(path, tmp, _tensor_bytes(state)):
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())   # the meta says "complete": the bytes must be on disk before it exists
        tmp.replace(path)
    try:
        atomic_write_json(meta, str(path.with_suffix(".json")))
    except BaseException:
        path.unlink(missing_ok=True)   # never loaded without its meta: do not leave it taking the space
        raise
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            delete_checkpoint(old)
    return path


def remove_run_temporaries(run_dir: Path) -> int:
    """What a killed or failed run leaves: *.tmp files, and checkpoints without their meta (never loaded)."""
    stale = [*run_dir.glob("*.tmp"), *run_dir.glob("*/*.tmp"),
             *(p for p in run_dir.glob("checkpoints/step_*.pt") if not p.with_suffix(".json").is_file())]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def prepare_run_dir(run_dir: Path, identity: dict, cfg, rank: int) -> str:
    """The run folder rule, applied before anything is built. Returns the checkpoint spec to resume from
    ('' = start fresh). Every rank checks (read only) so all refuse alike; rank 0 alone clears."""
    if cfg.overwrite and cfg.resume:
        raise RunFolderError("--overwrite starts over and --resume continues: pass one of them")
    manifest = run_dir / RUN_MANIFEST
    if cfg.overwrite:
        if rank == 0:
            removed = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
            for name in removed:
                shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
            if removed:
                print(f"[train] --overwrite: removed {', '.join(removed)} from {run_dir}")
        return ""
    if manifest.is_file():
        diffs = identity_differences(json.loads(manifest.read_text())["identity"], identity)
        if diffs:
            raise RunFolderError(f"{run_dir} holds another run; refusing to mix them (its checkpoints, log and "
                                 f"metrics would describe two runs). Differences: {'; '.join(diffs)}. Use another "
                                 f"--run, or --overwrite to clear it.")
        if not cfg.resume and list_checkpoints(run_dir):
            if rank == 0:
                print(f"[train] {run_dir} holds this same run: resuming it (--overwrite starts over)")
            return "latest"
    elif not cfg.resume and list_checkpoints(run_dir):
        raise RunFolderError(f"{run_dir} holds checkpoints of a run whose identity was not recorded: --resume "
                             f"latest continues it (its stored config is checked), --overwrite clears it, or use "
                             f"another --run")
    return cfg.resume


def check_checkpoint_config(ckpt: Path, state: dict, identity: dict):
    """Refuse to resume from a checkpoint written with other settings (or other data, when it recorded them)."""
    stored = {"config": {k: v for k, v in state.get("config", {}).items() if k not in NOT_IDENTITY}}
    now = {"config": identity["config"]}
    if "data" in state:
        stored["data"], now["data"] = state["data"], identity["data"]
    diffs = identity_differences(json.loads(json.dumps(stored, default=str)), now)
    if diffs:
        raise RunFolderError(f"{ckpt} was written with another configuration; refusing to resume from it. "
                             f"Differences: {'; '.join(diffs)}. Resume with its settings, or start a new run "
                             f"(another --run, or --overwrite).")


def export_checked(model, out_dir: Path) -> Path:
    """export_open_clip, with a full disk reported as one StorageError."""
    path = out_dir / "open_clip_model.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch_writing(path, path.with_suffix(".pt.tmp"), _tensor_bytes(model.state_dict())):
        return export_open_clip(model, out_dir)
