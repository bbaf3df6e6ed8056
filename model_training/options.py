"""The trainer's command line: TrainConfig and LossConfig fields as flags, objective presets as defaults.
Torch-free, so `python -m model_training.train --help` answers at once.

    from model_training.options import parse_args
    cfg = parse_args(["--shards", "out/filter/shards", "--preset", "conlip"])   # -> TrainConfig
"""
from __future__ import annotations

import argparse
import dataclasses

from model_training.config import LossConfig, TrainConfig
from model_training.presets import load_preset

REQUIRED = {"shards"}   # shown as required in --help, checked after presets are applied


def _help(text: str) -> str:
    """Help text + the default argparse will really use (after set_defaults: a caller's or a preset's)."""
    return text.replace("%", "%%") + " (default: %(default)r)"


def _add_dataclass_args(ap: argparse.ArgumentParser, cls, title: str):
    group = ap.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = (f.metadata.get("help", "").replace("%", "%%") + " (required)" if f.name in REQUIRED
                     else _help(f.metadata.get("help", "")))
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            group.add_argument(flag, type=type(default), default=default, help=help_text)


_LOSS_HELP = {
    "contrastive": "in-batch term: infonce | hn_nce | dcl | none", "hn_alpha": "HN-NCE positive weight",
    "hn_beta": "HN-NCE hardness (0 = uniform negatives)", "contrastive_weight": "weight of the in-batch term",
    "momentum_weight": "> 0 adds ConLIP's momentum-queue DCL term", "queue_size": "momentum queue length; 0 = 3 x global batch (ConLIP's ratio)",
    "momentum": "momentum-encoder EMA factor", "queue_temperature": "fixed temperature of the queue term",
    "concept_weight": "> 0 adds concept distillation (needs --labels)",
    "mlm_weight": "> 0 adds masked language modeling", "mim_weight": "> 0 adds masked image modeling",
    "masked_heads": "conditioned (ConMLM/ConMIM: other modality's CLS complete, tokens masked) | vanilla",
    "text_mask_ratio": "fraction of caption tokens masked", "image_mask_ratio": "fraction of patches masked",
    "head_heads": "attention heads of the light heads and fusion blocks",
    "itm_weight": "> 0 adds binary ITM with in-batch hard negatives", "fusion_layers": "fusion module depth",
    "text_denoise_weight": "> 0 adds text denoising", "text_noise_ratio": "fraction of caption tokens replaced",
    "image_denoise_weight": "> 0 adds image denoising", "image_noise_std": "noise std (normalised pixels)",
    "image_denoise_target": "ema (multimodal head, EMA target) | clean | noise (unimodal pixel head)",
    "repr_weight": "> 0 adds representation matching to an EMA target",
    "repr_corruption": "noise (representation denoising) | mask (masked representation modeling)",
    "repr_target": "tokens (MAMO: the EMA target's fusion tokens, plain L2) | pooled_cosine (2 - 2 cos of the joint embedding)",
    "repr_momentum": "EMA factor of the EMA target model",
    "queue_loss": "dcl | infonce: the queue term", "mim_target": "pixels | ema_features: what MIM predicts"}


def parse_args(argv=None, defaults: dict | None = None, description: str | None = None) -> TrainConfig:
    """argv -> TrainConfig. `defaults` replaces TrainConfig's defaults (a preset's values still win over
    them, explicit flags over both), and --help shows them."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", dest="run_dir", default=argparse.SUPPRESS, help="alias of --run-dir")
    _add_dataclass_args(ap, TrainConfig, "training")
    lg = ap.add_argument_group("objective")
    for f in dataclasses.fields(LossConfig):
        lg.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                        help=_help(_LOSS_HELP.get(f.name, "")))
    ap.set_defaults(**(defaults or {}))
    known, _ = ap.parse_known_args(argv)
    if known.preset:   # the preset's values become defaults, so flags given explicitly still win
        preset = load_preset(known.preset)
        ap.set_defaults(**preset["loss"], **preset["train"])
    a = vars(ap.parse_args(argv))
    loss = LossConfig(**{f.name: a.pop(f.name) for f in dataclasses.fields(LossConfig)})
    if not a.get("shards"):
        ap.error("--shards is required")
    return TrainConfig(**a, loss=loss)
