"""The trainer's settings as two small dataclasses, importable without torch (so `--help` and the
preset checks are instant): TrainConfig (the loop, data, run folder) and LossConfig (the objective's
terms and weights). Each field's comment or help text says why its default is what it is.

    from model_training.config import TrainConfig, LossConfig
    TrainConfig(shards="out/filter/shards", max_steps=300, loss=LossConfig(contrastive="hn_nce"))
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LossConfig:
    contrastive: str = "infonce"     # infonce | hn_nce | dcl | none: the in-batch term
    hn_alpha: float = 1.0            # HN-NCE positive weight (DiHT uses 1.0)
    hn_beta: float = 0.5             # HN-NCE hardness; 0 = uniform negatives (DiHT tunes ~0.5)
    contrastive_weight: float = 1.0
    momentum_weight: float = 0.0     # > 0 adds ConLIP's momentum-queue DCL term
    queue_size: int = 0              # 0 = 3 x the global batch (batch x ranks x accum_steps): ConLIP's 12,288 is 3
                                     # batches of 4,096, so keys are <= 3 steps old (effective_queue_size); > 0 = fixed
    queue_loss: str = "dcl"          # dcl (ConLIP) | infonce (positive kept in the denominator; ConLIP's comparison)
    momentum: float = 0.99           # EMA factor of the momentum encoder (ConLIP / MoCo)
    queue_temperature: float = 0.05  # fixed temperature of the queue term (ConLIP)
    concept_weight: float = 0.0      # > 0 adds DiHT concept distillation (needs label shards)
    # token-level objectives (model_training/masked.py, denoise.py, itm.py); heads are dropped at export
    mlm_weight: float = 0.0          # > 0 adds masked language modeling
    mim_weight: float = 0.0          # > 0 adds masked image modeling
    mim_target: str = "pixels"       # pixels (SimMIM / ConLIP's L1) | ema_features (MAMO: EMA encoder's clean visual tokens)
    masked_heads: str = "conditioned"  # conditioned (ConLIP's ConMLM/ConMIM) | vanilla (complete other modality)
    text_mask_ratio: float = 0.15    # BERT / ConLIP
    image_mask_ratio: float = 0.5    # ConLIP
    head_heads: int = 2              # attention heads of every head / fusion block (light by design)
    itm_weight: float = 0.0          # > 0 adds binary image-text matching with in-batch hard negatives (ALBEF)
    fusion_layers: int = 2           # cross-attention blocks of the fusion module (ITM, representation terms)
    text_denoise_weight: float = 0.0   # > 0 adds text denoising (detect + restore replaced tokens)
    text_noise_ratio: float = 0.15   # fraction of caption WORDS replaced (all their tokens) by words drawn from the
                                     # training corpus's word frequencies
    image_denoise_weight: float = 0.0  # > 0 adds image denoising
    image_noise_std: float = 0.5     # Gaussian noise std in normalised-pixel units
    image_denoise_target: str = "ema"  # ema (noisy image attends to clean text; L1 to the EMA model's clean/clean
                                       # reconstruction: the proposal) | clean / noise (unimodal linear pixel head)
    repr_weight: float = 0.0         # > 0 matches corrupted-pair joint embeddings to an EMA target's clean pair
    repr_corruption: str = "noise"   # noise (representation denoising) | mask (masked representation modeling)
    repr_target: str = "tokens"      # tokens (MAMO: the EMA target's multimodal token representations, plain L2) |
                                     # pooled_cosine (squared L2 of the normalised joint embeddings, = 2 - 2 cos)
    repr_momentum: float = 0.995     # EMA factor of the shared EMA target model (representation, image-denoising
                                     # and feature-MIM targets; MAMO-style, slower than MoCo's)


def _f(default, help_text):
    """A dataclass field whose reason doubles as its --help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    shards: str = _f("", "folder / glob / file of Parquet shards with key, caption, jpg")
    labels: str = _f("", "LABELS dir (shards/*.parquet + vocab.json) for concept distillation; '' = none")
    allow_missing_labels: bool = _f(False, "train even when --labels has no label for some shard files (default: "
                                           "refused, as labels distilled from another filter OUTPUT match no key)")
    image_features: str = _f("", "feature cache of a frozen image teacher (model_training.features): a locked "
                                 "image tower (LiT), only a head on the features trains; '' = full image tower")
    run_dir: str = _f("runs/default", "where checkpoints, logs, plots and the export go")
    model: str = _f("catclip-tiny", "preset in model_training/configs, open_clip model name, or JSON config path")
    init_checkpoint: str = _f("", "local open_clip checkpoint to start from ('' = random init)")
    text_attention: str = _f("causal", "text tower attention: causal (CLIP) | bidirectional (BERT-like, as ConLIP "
                                       "and MAMO: no causal mask, SOT-token pooling; the masked/denoising presets "
                                       "set it; exported as <model>-bidir, loads in open_clip)")
    batch_size: int = _f(64, "per-rank micro-batch; contrastive negatives = batch x ranks")
    accum_steps: int = _f(1, "micro-batches per optimizer step (note: negatives stay per micro-batch)")
    max_steps: int = _f(300, "optimizer steps; training is counted in steps, data cycles as needed")
    lr: float = _f(5e-4, "peak learning rate (open_clip's CLIP recipes use 5e-4 at batch 32k)")
    min_lr_ratio: float = _f(0.0, "final lr as a fraction of the peak")
    schedule: str = _f("cosine", "decay after warmup: cosine | linear")
    warmup_steps: int = _f(30, "linear warmup: avoids early instability of the learnable temperature")
    weight_decay: float = _f(0.2, "AdamW decay on matrices only (open_clip's CLIP default)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.98, "AdamW beta2; 0.98 as in CLIP, steadier than 0.999 for large-batch contrastive")
    eps: float = _f(1e-6, "AdamW eps (CLIP's value)")
    grad_clip: float = _f(1.0, "max global grad norm; 0 = off")
    precision: str = _f("auto", "auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32")
    compile: bool = _f(False, "torch.compile the two encoders (pays off on GPU for long runs)")
    num_workers: int = _f(2, "DataLoader workers per rank; shards must be >= workers x ranks")
    shuffle_buffer: int = _f(2048, "rows held for shuffling per worker; 0 = stream order")
    seed: int = _f(0, "seeds init, file order, shuffle buffer and augmentation")
    holdout_fraction: float = _f(0.0, "fraction of keys (by hash) excluded from training, for evaluation")
    train_fraction: float = _f(1.0, "train on this fraction of the non-held-out keys (by an independent hash; "
                                    "data-scaling ablations)")
    preset: str = _f("", "objective preset (configs/objectives/<name>.json: clip, diht, conlip, conlip-vanilla, "
                         "cl, denoise, masked); explicit flags override its values")
    checkpoint_every: int = _f(100, "steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = _f(3, "newest checkpoints kept; 0 = keep all")
    log_every: int = _f(10, "steps between CSV/TensorBoard rows")
    resume: str = _f("", "'latest' (newest checkpoint in RUN/checkpoints) or a checkpoint path; the same "
                         "command in the same RUN resumes by itself")
    overwrite: bool = _f(False, "clear RUN (checkpoints, logs, export, metrics) and start over, e.g. when it "
                                "holds another run")
    stop_after: int = _f(0, "stop after this step as if preempted, schedule still spans max_steps (0 = off)")
    device: str = _f("auto", "auto | cpu | cuda")
    loss: LossConfig = field(default_factory=LossConfig)


QUEUE_TO_BATCH = 3   # ConLIP: queue 12,288 = 3 x its global batch of 4,096


def effective_queue_size(cfg: "TrainConfig", world_size: int = 1) -> int:
    """The momentum queue's length for this run: an explicit --queue-size (> 0), else 3 x the global
    batch, i.e. the keys of the last 3 optimizer steps (every micro-batch enqueues its keys)."""
    if cfg.loss.queue_size > 0:
        return cfg.loss.queue_size
    return QUEUE_TO_BATCH * cfg.batch_size * world_size * cfg.accum_steps


def with_effective_queue(cfg: "TrainConfig", world_size: int = 1) -> "TrainConfig":
    """A copy of cfg whose loss.queue_size is the resolved length (recorded in run.json and checkpoints)."""
    from dataclasses import replace
    return replace(cfg, loss=replace(cfg.loss, queue_size=effective_queue_size(cfg, world_size)))
