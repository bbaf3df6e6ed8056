"""The run folder of model_training.train: its identity, checkpoints, temporaries and full-disk errors.

    identity = run_identity(cfg, shards)              # config that shapes training + data fingerprint
    prepare_run_dir(run_dir, identity, cfg, rank)     # refuse another run (differences named), or resume / overwrite
    save_checkpoint(run_dir, state, meta, keep)       # rotation by step, never by file name
    find_checkpoint(run_dir, "latest")

A RUN folder holds one run: RUN/run.json records its identity; a different configuration or other
data is refused with the differences named (--overwrite clears only what train writes). Checkpoints
are ordered by the step in their meta, writes go through temporaries, and a full disk is one
pipeline.store.partitions.StorageError with the temporary removed.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from model_training.data import label_files
from model_training.models import export_open_clip
from pipeline.store import storage
from pipeline.store.partitions import atomic_write_json, dict_differences, writing

RUN_MANIFEST = "run.json"
# settings that do not change what is trained: they may differ between a run and its resume. The data
# enters the identity as a fingerprint of its files, not as paths (a moved folder holds the same data).
NOT_IDENTITY = ("shards", "labels", "allow_missing_labels", "run_dir", "resume", "overwrite", "stop_after", "log_every",
                "checkpoint_every", "keep_checkpoints", "compile", "device")
# what train and train_eval write into RUN: --overwrite removes these and nothing else (RUN may be ".")
RUN_OUTPUTS = ("checkpoints", "tensorboard", "export", "log.csv", "loss_curve.png", "train_summary.json",
               "metrics.json", "recall.png", RUN_MANIFEST)


class RunFolderError(ValueError):
    """RUN holds another run, or a checkpoint was written with another configuration."""


def _files_fingerprint(paths) -> str:
    """Names and sizes: stat only (no data read, fine for 100k shards) and enough to tell re-filtered data apart.
    Paths may be URIs (pipeline.store.storage); Path serves only as the sort key, as it always did."""
    h = hashlib.sha256()
    for p in sorted(paths, key=Path):
        h.update(f"{storage.basename(str(p))}|{storage.size(str(p))}\n".encode())
    return h.hexdigest()[:16]


def run_identity(cfg, shards: list[str]) -> dict:
    """What makes two runs the same run: the settings that shape the trajectory + the data's fingerprint."""
    labels = "none"
    if cfg.labels:
        labels = _files_fingerprint(label_files(cfg.labels))
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


def _read_checkpoint(pt: Path, device) -> dict:
    """A checkpoint's state, or RunFolderError in one line when the file is not one of this trainer's
    (truncated, random bytes, a pickle with code in it: torch's weights_only loader refuses those)."""
    import warnings
    try:
        with warnings.catch_warnings():   # torch warns about foreign pickles before refusing them: one line is ours
            warnings.simplefilter("ignore")
            state = torch.load(pt, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise RunFolderError(f"{pt} does not exist") from None
    except Exception as e:  # noqa: BLE001 - RuntimeError, UnpicklingError, EOFError, IndexError, zip errors...
        why = "unreadable" if not isinstance(e, __import__("pickle").UnpicklingError) else "holds more than tensors"
        raise RunFolderError(f"{pt} is not a checkpoint of this trainer ({why}: {type(e).__name__})") from None
    if not isinstance(state, dict) or not {"trainee", "optimizer", "step"} <= set(state):
        raise RunFolderError(f"{pt} is not a checkpoint of this trainer (no trainee / optimizer / step in it)")
    return state


def load_checkpoint(run_dir: Path, spec: str, device) -> tuple[Path | None, dict | None]:
    """(path, state) to resume from. 'latest': the newest checkpoint that loads - an unreadable newer one
    (truncated by a crash, overwritten with other bytes) is named and passed over for the one before; a
    path: that checkpoint, or RunFolderError in one line. (None, None) when RUN has none."""
    if spec != "latest":
        return Path(spec), _read_checkpoint(Path(spec), device)
    for _, pt in reversed(list_checkpoints(run_dir)):
        try:
            return pt, _read_checkpoint(pt, device)
        except RunFolderError as e:
            print(f"[train] {e}; falling back to the checkpoint before it", flush=True)
    return None, None


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
    """pipeline.store.partitions.writing for torch.save: torch reports a failed write as an opaque RuntimeError
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
    A full disk raises pipeline.store.partitions.StorageError with the temporary removed."""
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


# ------------------------------------------------------------------ RUN in an object store
def mirror_dir(run_uri: str) -> Path:
    """The local working copy of a remote RUN (CATCURATE_RUN_CACHE, else the temp folder): one per URI, so a
    resume on the same machine finds it, and on another machine it is rebuilt from the store."""
    import tempfile
    base = Path(os.environ.get("CATCURATE_RUN_CACHE") or Path(tempfile.gettempdir()) / "catcurate-runs")
    return base / hashlib.sha256(run_uri.encode()).hexdigest()[:16]


class RunMirror:
    """A remote RUN (s3://, gs://, ...) worked on in a local copy, the way open_clip's --remote-sync does:
    `pull` copies the store's RUN down (its checkpoints are what a resume needs), `push` copies new and
    changed files up and deletes what the run deleted (rotated checkpoints). Uploads go .pt before the
    .json meta that marks a checkpoint complete, so a reader of the store never meets a meta without its
    checkpoint; every object is one whole PUT (no renames in a store)."""

    def __init__(self, run_uri: str):
        self.uri = storage.normalize(run_uri)
        self.local = mirror_dir(self.uri)
        self._pushed: dict[str, tuple[int, int]] = {}

    def pull(self) -> Path:
        self.local.mkdir(parents=True, exist_ok=True)
        fs, root = storage.filesystem(self.uri)
        remote = {p[len(root):].lstrip("/") for p in fs.find(root)} if fs.exists(root) else set()
        remote = {r for r in remote if not posixpath.basename(r).startswith(".")}   # the lock, probes
        for rel in sorted(remote):
            dst = self.local / rel
            tmp = dst.with_name(dst.name + ".pull.tmp")
            storage.download(storage.join(self.uri, rel), str(tmp))
            tmp.replace(dst)
        for p in self._local_files():   # what the store does not have is not part of the run
            if str(p.relative_to(self.local)) not in remote:
                p.unlink()
        self._pushed = {str(p.relative_to(self.local)): self._stamp(p) for p in self._local_files()}
        return self.local

    def push(self) -> None:
        files = {str(p.relative_to(self.local)): p for p in self._local_files()}
        changed = [rel for rel, p in files.items() if self._pushed.get(rel) != self._stamp(p)]
        for rel in sorted(changed, key=lambda r: (r.startswith("checkpoints/") and r.endswith(".json"), r)):
            storage.upload(str(files[rel]), storage.join(self.uri, rel))
            self._pushed[rel] = self._stamp(files[rel])
        for rel in sorted(set(self._pushed) - set(files), key=lambda r: not r.endswith(".json")):
            storage.remove(storage.join(self.uri, rel))   # meta first: the checkpoint stops counting
            del self._pushed[rel]

    def _local_files(self) -> list[Path]:
        return [p for p in self.local.rglob("*") if p.is_file() and not p.name.endswith(".tmp")
                and not p.name.startswith(".")]

    @staticmethod
    def _stamp(p: Path) -> tuple[int, int]:
        st = p.stat()
        return st.st_size, st.st_mtime_ns


@contextmanager
def staged_run(run_uri: str, job: str):
    """`with staged_run("s3://b/runs/x", "train") as mirror:` train in mirror.local, call mirror.push()
    after each checkpoint; the store's RUN holds the lock meanwhile and gets everything on the way out
    (also after a failure: finished checkpoints and logs are not lost)."""
    from pipeline.store.locks import folder_lock
    storage.check_access(run_uri, write=True)
    with folder_lock(run_uri, job):
        mirror = RunMirror(run_uri)
        mirror.pull()
        try:
            yield mirror
        finally:
            mirror.push()
