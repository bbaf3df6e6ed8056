"""Objective presets: model_training/configs/objectives/<name>.json, selected with --preset NAME.

    .venv/bin/catcurate train --shards ... --preset conlip --model catclip-tiny   # size x objective
    from model_training.presets import list_presets, load_preset
    load_preset("conlip")   # {"name", "description", "loss": {LossConfig fields}, "train": {...}, "needs_labels"}

A preset file holds {"description", "loss": {...}, optional "train": {...}, optional "needs_labels"}.
Keys are checked against LossConfig / TrainConfig so a typo fails loudly instead of silently
training a different objective. Presets set objective values only; the model size comes from
--model, so every preset composes with every model config. Flags given explicitly override a preset.

Preset values are the papers'. ConLIP's queues hold 12,288 keys = 3 x its global batch of 4,096: the
presets give queue_size 0, which the trainer resolves to 3 x the global batch (batch x ranks x
accumulation steps; config.effective_queue_size) and records in the run's config; --queue-size N fixes
it. MAMO (`masked`) predicts the EMA encoder's clean visual tokens, ConLIP predicts pixels; `denoise`
reconstructs the image's pixels through the multimodal head, anchored to the clean patches, with the
EMA model's clean reconstruction as the noisy pass's target. The presets that mask or noise text (and
ConLIP's CL baseline, to differ from ConLIP only by the heads) set train.text_attention =
"bidirectional" (BERT-like text tower, as ConLIP and MAMO use).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from model_training.config import QUEUE_TO_BATCH, LossConfig, TrainConfig

OBJECTIVE_DIR = Path(__file__).resolve().parent / "configs" / "objectives"
CONLIP_QUEUE_TO_BATCH = QUEUE_TO_BATCH    # ConLIP: queue 12,288 / batch 4,096


def list_presets() -> list[str]:
    return sorted(p.stem for p in OBJECTIVE_DIR.glob("*.json"))


def load_preset(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = OBJECTIVE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name_or_path!r}; presets: {', '.join(list_presets())} "
                         f"(or a path to a preset JSON)")
    data = json.loads(path.read_text())
    unknown_top = set(data) - {"description", "loss", "train", "needs_labels"}
    loss_fields = {f.name for f in dataclasses.fields(LossConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"loss", "preset"}
    bad = sorted(unknown_top | (set(data.get("loss", {})) - loss_fields) | (set(data.get("train", {})) - train_fields))
    if bad:
        raise ValueError(f"{path}: unknown key(s) {bad}; loss keys are LossConfig fields, train keys TrainConfig fields")
    return {"name": path.stem, "description": data.get("description", ""), "loss": dict(data.get("loss", {})),
            "train": dict(data.get("train", {})), "needs_labels": bool(data.get("needs_labels", False))}
