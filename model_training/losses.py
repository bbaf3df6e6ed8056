"""Training objectives: each an nn.Module returning a dict of named terms, composed by weights.

    from model_training.losses import info_nce, hn_nce, dcl, LossConfig, build_objective
    info_nce(img, txt, logit_scale)            # scalar, image->text + text->image (2x open_clip ClipLoss)
    objective = build_objective(LossConfig(contrastive="hn_nce", concept_weight=1.0), model, n_obj, n_att)
    terms = objective(outputs)                 # {"hn_nce": ..., "concept_objects": ..., "loss": weighted sum}

Conventions: embeddings are L2-normalised; `logit_scale` is the multiplier 1/temperature (already
exponentiated, like the third output of open_clip's CLIP.forward). Under DDP the embeddings passed
in are the all-gathered global batch (`gather_with_grad`), so every rank computes the same loss over
all N x N pairs and gradients flow back to the rank that produced each embedding.
Losses are computed in float32 even under bf16 autocast: logsumexp over a batch is where bf16 hurts.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model_training.config import LossConfig  # noqa: F401 (imported from here too)


# ------------------------------------------------------------------ functional forms
def _up(x):
    """Half-precision inputs (autocast) are computed in float32; float64 stays float64 (gradcheck)."""
    return x.float() if torch.is_tensor(x) and x.dtype in (torch.bfloat16, torch.float16) else x


def _logits(image_emb, text_emb, logit_scale):
    return _up(logit_scale) * _up(image_emb) @ _up(text_emb).T


def _check_batch(s: torch.Tensor):
    if s.shape[0] < 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"contrastive losses need a square similarity matrix with N >= 2 pairs, got {tuple(s.shape)}")


def info_nce(image_emb, text_emb, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE: CE(image->text) + CE(text->image). open_clip's ClipLoss is the MEAN of
    the two directions, so info_nce == 2 * ClipLoss."""
    s = _logits(image_emb, text_emb, logit_scale)
    _check_batch(s)
    target = torch.arange(s.shape[0], device=s.device)
    return F.cross_entropy(s, target) + F.cross_entropy(s.T, target)


def _hn_nce_one_way(s: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """mean_i[ log(alpha e^{s_ii} + sum_{j!=i} w_ij e^{s_ij}) - s_ii ],
    w_ij = (N-1) e^{beta s_ij} / sum_{k!=i} e^{beta s_ik}  (DiHT, DESIGN.md), all in log space.
    The weights are not detached: the formula is differentiated as written."""
    n = s.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    pos = s.diagonal()
    scaled = (beta * s).masked_fill(eye, float("-inf"))          # beta*s first: 0 * -inf would be nan
    log_w = math.log(n - 1) + scaled - torch.logsumexp(scaled, dim=1, keepdim=True)
    terms = (log_w + s).masked_fill(eye, float("-inf"))
    if alpha > 0:
        terms = torch.where(eye, math.log(alpha) + s, terms)
    return (torch.logsumexp(terms, dim=1) - pos).mean()


def _check_hn_args(alpha: float, beta: float, allow_dcl: bool = False):
    if not (0.0 < alpha <= 1.0 or (allow_dcl and alpha == 0.0)):
        raise ValueError(f"HN-NCE alpha must be in (0, 1], got {alpha} (alpha = 0 is DCL: use --contrastive dcl)")
    if not beta >= 0.0:
        raise ValueError(f"HN-NCE beta must be >= 0 (0 = uniform negatives), got {beta}")


def hn_nce(image_emb, text_emb, logit_scale, alpha: float = 1.0, beta: float = 0.0,
           allow_dcl: bool = False) -> torch.Tensor:
    """HN-NCE (Radenovic et al. 2023): hard negatives up-weighted by beta, positive weighted by
    alpha, both directions summed. alpha=1, beta=0 is info_nce; alpha=0, beta=0 is dcl.

    DiHT's ranges are checked: alpha in (0, 1] (the positive keeps some weight; 0 removes it, which is
    DCL: ask for it by name, `dcl` / --contrastive dcl, or pass allow_dcl=True) and beta >= 0 (a
    negative beta would DOWN-weight hard negatives)."""
    _check_hn_args(alpha, beta, allow_dcl)
    s = _logits(image_emb, text_emb, logit_scale)
    _check_batch(s)
    return _hn_nce_one_way(s, alpha, beta) + _hn_nce_one_way(s.T, alpha, beta)


def _dcl_one_way(s: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    return (torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=1) - s.diagonal()).mean()


def dcl(image_emb, text_emb, logit_scale) -> torch.Tensor:
    """Decoupled contrastive loss (Yeh et al. 2022): the positive is left out of the denominator."""
    s = _logits(image_emb, text_emb, logit_scale)
    _check_batch(s)
    return _dcl_one_way(s) + _dcl_one_way(s.T)


# ------------------------------------------------------------------ distributed helpers
def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks (rank order), keeping the autograd path to the local part.
    torch.distributed.nn.all_gather's backward sums the gradients of all ranks' (identical) losses,
    and DDP then averages over ranks, so parameters get exactly the gradient of the global loss."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn as dist_nn
    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


# ------------------------------------------------------------------ objective modules
class ContrastiveLoss(nn.Module):
    """In-batch contrastive term; temperature is the model's learnable logit_scale."""

    def __init__(self, kind: str = "infonce", alpha: float = 1.0, beta: float = 0.0):
        super().__init__()
        if kind not in ("infonce", "hn_nce", "dcl"):
            raise ValueError(f"contrastive kind must be infonce | hn_nce | dcl, got {kind!r}")
        if kind == "hn_nce":
            _check_hn_args(alpha, beta)   # at build time: a bad --hn-alpha fails before any training
        self.kind, self.alpha, self.beta = kind, alpha, beta

    def forward(self, out: dict) -> dict:
        img, txt, scale = out["image_emb"], out["text_emb"], out["logit_scale"]
        if self.kind == "infonce":
            return {"infonce": info_nce(img, txt, scale)}
        if self.kind == "dcl":
            return {"dcl": dcl(img, txt, scale)}
        return {"hn_nce": hn_nce(img, txt, scale, self.alpha, self.beta)}


class MomentumQueueContrastive(nn.Module):
    """ConLIP's instance-level loss (Luo et al. 2022, eq. 9-11): each online embedding is contrasted
    with the momentum encoder's key of its own pair (the positive) and, as negatives, the entries of
    the other modality's queue only (q_j in Q), never the batch's other momentum keys. `kind` "dcl"
    (ConLIP) leaves the positive out of the denominator, "infonce" (ConLIP's comparison) keeps it in:

        dcl:     L_i = log sum_{q in Q} e^{s(x_i, q)/tau} - s(x_i, k_i)/tau
        infonce: L_i = log (e^{s(x_i, k_i)/tau} + sum_{q in Q} e^{s(x_i, q)/tau}) - s(x_i, k_i)/tau

    image->text (queries: online image embeddings, keys: momentum text keys and the text queue) plus
    text->image. The queues are initialised as in MoCo with random unit vectors, so the term is
    defined from the first step; the current batch's keys are enqueued AFTER the loss (they are
    negatives from the next step on). Queue size: 3 x the global batch by default (ConLIP: 12,288 =
    3 x 4,096; resolved by config.effective_queue_size), so keys are at most 3 optimizer steps old.
    Temperature is fixed (paper: 0.05), as in MoCo."""

    def __init__(self, model: nn.Module, embed_dim: int, queue_size: int = 12288,
                 momentum: float = 0.99, temperature: float = 0.05, kind: str = "dcl"):
        super().__init__()
        if queue_size < 1 or not 0.0 <= momentum < 1.0 or temperature <= 0:
            raise ValueError(f"need queue_size >= 1, 0 <= momentum < 1, temperature > 0; got "
                             f"{queue_size}, {momentum}, {temperature}")
        if kind not in ("dcl", "infonce"):
            raise ValueError(f"queue_loss must be dcl | infonce, got {kind!r}")
        self.momentum, self.temperature, self.kind = momentum, temperature, kind
        self.ema = copy.deepcopy(model)
        self.ema.requires_grad_(False)
        self.register_buffer("image_queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self, model: nn.Module):
        """EMA of the online weights; call after each optimizer step."""
        for ema_p, p in zip(self.ema.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.momentum)

    @torch.no_grad()
    def _enqueue(self, image_keys: torch.Tensor, text_keys: torch.Tensor):
        q = self.image_queue.shape[0]
        keys_i, keys_t = image_keys[-q:], text_keys[-q:]           # a batch larger than the queue keeps its tail
        idx = (self.queue_ptr + torch.arange(keys_i.shape[0], device=keys_i.device)) % q
        self.image_queue[idx] = keys_i.to(self.image_queue.dtype)
        self.text_queue[idx] = keys_t.to(self.text_queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys_i.shape[0]) % q)

    def _against(self, query: torch.Tensor, positive_keys: torch.Tensor, queue: torch.Tensor):
        """Mean over queries of eq. 9-11: positive = the pair's own momentum key, negatives = the queue."""
        t = self.temperature
        pos = (query * positive_keys).sum(-1) / t                           # [B]
        s_queue = query @ queue.T / t                                       # [B, Q]
        if self.kind == "infonce":
            s_queue = torch.cat([pos[:, None], s_queue], dim=1)
        return (torch.logsumexp(s_queue, dim=1) - pos).mean()

    def forward(self, out: dict) -> dict:
        with torch.no_grad():
            k_img = gather_no_grad(self.ema.encode_image(out["images"]).float())
            k_txt = gather_no_grad(self.ema.encode_text(out["texts"]).float())
        img, txt = _up(out["image_emb"]), _up(out["text_emb"])
        # clones: backward needs the queues as they were, and _enqueue below overwrites them in place
        loss = (self._against(img, k_txt, self.text_queue.clone())
                + self._against(txt, k_img, self.image_queue.clone()))
        if self.training:
            self._enqueue(k_img, k_txt)
        return {f"momentum_{self.kind}": loss}


class ConceptDistillation(nn.Module):
    """Two linear heads on the (normalised) image embedding, trained with soft cross-entropy
    against sparse top-k teacher targets (DiHT). Samples without labels are masked out and the
    term is a mean over labelled samples only."""

    def __init__(self, embed_dim: int, n_objects: int, n_attributes: int):
        super().__init__()
        if n_objects < 1 or n_attributes < 1:
            raise ValueError(f"concept vocabularies must be non-empty, got {n_objects} objects, {n_attributes} attributes")
        self.object_head = nn.Linear(embed_dim, n_objects)
        self.attribute_head = nn.Linear(embed_dim, n_attributes)

    @staticmethod
    def soft_ce(logits: torch.Tensor, indices: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor):
        """indices [B,K] (-1 = padding), probs [B,K] (0 at padding); mean over mask-true rows."""
        logp = F.log_softmax(_up(logits), dim=-1).gather(1, indices.clamp(min=0))
        per_sample = -(probs.to(logp.dtype) * logp).sum(dim=1)
        # 0 * sum keeps the heads in the graph when a batch has no labels (DDP needs every param used)
        return (per_sample * mask).sum() / mask.sum().clamp(min=1)

    def forward(self, out: dict) -> dict:
        c = out["concepts"]
        emb, mask = out["image_emb_local"], c["has_labels"].float()
        return {
            "concept_objects": self.soft_ce(self.object_head(emb), c["object_indices"], c["object_probs"], mask),
            "concept_attributes": self.soft_ce(self.attribute_head(emb), c["attribute_indices"],
                                               c["attribute_probs"], mask),
        }


# Version of the objective modules' state (the checkpoint's "trainee" part). A checkpoint of an older
# version that no longer loads is refused with one line naming the change (check_objective_format).
OBJECTIVE_FORMAT = 2
FORMAT_CHANGES = {
    2: "issue #24: ConLIP queues start from random unit keys and give only queue negatives (no queue_filled), "
       "image denoising decodes to patch pixels, word-level text noise, token-level representation targets",
}


def check_objective_format(ckpt, state: dict, trainee: nn.Module):
    """Refuse, in one line naming the change, a checkpoint written before the current objective format
    whose state no longer fits the objective (one that still fits loads as before)."""
    written = int(state.get("objective_format", 1))
    if written >= OBJECTIVE_FORMAT:
        return
    missing, unexpected = [], []
    own = trainee.state_dict()
    for k, v in state["trainee"].items():
        if k not in own or own[k].shape != v.shape:
            unexpected.append(k)
    missing = [k for k in own if k not in state["trainee"]]
    if missing or unexpected:
        changes = "; ".join(FORMAT_CHANGES[v] for v in range(written + 1, OBJECTIVE_FORMAT + 1))
        names = ", ".join((unexpected + missing)[:3]) + (" ..." if len(unexpected + missing) > 3 else "")
        raise ValueError(f"{ckpt} was written by an older objective (format {written}, now {OBJECTIVE_FORMAT}: "
                         f"{changes}) and no longer loads ({names}); start a new run (another --run, or --overwrite)")


STAT_PREFIX = "stat_"   # terms named stat_* are logged (e.g. ConLIP's attention statistic), never optimised


class Objective(nn.Module):
    """Weighted sum of the enabled terms. Returns every raw term plus "loss" (the weighted sum).
    `shared` holds modules several terms use (the Corruptor with the mask embeddings, the fusion
    module, the EMA target encoder); token-level terms get a per-step heads.Views cache in their input as out["views"]."""

    def __init__(self, parts: dict[str, nn.Module], weights: dict[str, float], shared: dict[str, nn.Module] | None = None):
        super().__init__()
        if not parts:
            raise ValueError("no loss term enabled")
        self.parts = nn.ModuleDict(parts)
        self.weights = dict(weights)
        self.shared = nn.ModuleDict(shared or {})

    def forward(self, out: dict) -> dict:
        if "model" in out:
            from model_training.heads import Views
            shared = dict(self.shared.items())
            out = {**out, "views": Views(out, shared.get("corruptor"), shared.get("ema")),
                   "fusion": shared.get("fusion")}
        terms, total = {}, 0.0
        for name, part in self.parts.items():
            for term, value in part(out).items():
                terms[term] = value
                if not term.startswith(STAT_PREFIX):
                    total = total + self.weights[name] * value
        terms["loss"] = total
        return terms

    @torch.no_grad()
    def after_step(self, model: nn.Module):
        """EMA updates of every momentum copy; the trainer calls this after each optimizer step."""
        if self.momentum is not None:
            self.momentum.momentum_update(model)
        if "ema" in self.shared:
            self.shared["ema"].update(model)
        for part in self.parts.values():   # EMA copies of the terms' own heads (fusion, denoising head)
            if hasattr(part, "update_ema_heads"):
                part.update_ema_heads(self.shared)

    @property
    def momentum(self) -> MomentumQueueContrastive | None:
        return self.parts["momentum"] if "momentum" in self.parts else None


def build_objective(cfg: LossConfig, model: nn.Module, n_objects: int = 0, n_attributes: int = 0,
                    caption_shards: list[str] | None = None, holdout_fraction: float = 0.0,
                    corpus_words=None) -> Objective:
    """The enabled terms. Text denoising draws replacement words from the training corpus: pass the
    training shards (caption_shards; held-out keys excluded) or a prebuilt heads.CorpusWords."""
    parts, weights = {}, {}
    if cfg.contrastive != "none" and cfg.contrastive_weight > 0:
        parts["contrastive"] = ContrastiveLoss(cfg.contrastive, cfg.hn_alpha, cfg.hn_beta)
        weights["contrastive"] = cfg.contrastive_weight
    if cfg.momentum_weight > 0:
        if cfg.queue_size < 1:
            raise ValueError("queue_size 0 means 3 x the global batch: resolve it first with "
                             "config.effective_queue_size / with_effective_queue (the trainer does)")
        parts["momentum"] = MomentumQueueContrastive(model, model.embed_dim, cfg.queue_size, cfg.momentum,
                                                     cfg.queue_temperature, cfg.queue_loss)
        weights["momentum"] = cfg.momentum_weight
    if cfg.concept_weight > 0:
        if not (n_objects and n_attributes):
            raise ValueError("concept_weight > 0 needs label shards and a vocab.json (--labels LABELS)")
        parts["concepts"] = ConceptDistillation(model.embed_dim, n_objects, n_attributes)
        weights["concepts"] = cfg.concept_weight
    if cfg.text_denoise_weight > 0 and corpus_words is None:
        if not caption_shards:
            raise ValueError("text denoising draws replacement words from the training corpus: build the objective "
                             "with caption_shards (the training shards) or corpus_words")
        from model_training.denoise import corpus_words_from_shards
        from model_training.models import get_tokenizer
        corpus_words = corpus_words_from_shards(caption_shards, get_tokenizer(model.name), holdout_fraction)
    shared = _build_token_objectives(cfg, model, parts, weights, corpus_words)
    return Objective(parts, weights, shared)


def _build_token_objectives(cfg: LossConfig, model: nn.Module, parts: dict, weights: dict, corpus_words=None) -> dict:
    """Adds the enabled token-level terms to parts/weights; returns the modules they share."""
    from model_training.denoise import ImageDenoising, RepresentationTarget, TextDenoising
    from model_training.heads import CorruptionConfig, Corruptor, EmaEncoder
    from model_training.itm import FusionEncoder, ImageTextMatching
    from model_training.masked import MaskedImageModeling, MaskedLanguageModeling

    if cfg.masked_heads not in ("conditioned", "vanilla"):
        raise ValueError(f"masked_heads must be conditioned | vanilla, got {cfg.masked_heads!r}")
    conditioned = cfg.masked_heads == "conditioned"
    token_terms = {
        "mlm": (cfg.mlm_weight, lambda: MaskedLanguageModeling(model, cfg.head_heads, conditioned)),
        "mim": (cfg.mim_weight, lambda: MaskedImageModeling(model, cfg.head_heads, conditioned, cfg.mim_target)),
        "itm": (cfg.itm_weight, lambda: ImageTextMatching(model)),
        "text_denoise": (cfg.text_denoise_weight, lambda: TextDenoising(model, cfg.head_heads)),
        "image_denoise": (cfg.image_denoise_weight, lambda: ImageDenoising(model, cfg.head_heads, cfg.image_denoise_target,
                                                                           cfg.repr_momentum)),
    }
    shared = {}
    needs_ema = (cfg.repr_weight > 0 or (cfg.image_denoise_weight > 0 and cfg.image_denoise_target == "ema")
                 or (cfg.mim_weight > 0 and cfg.mim_target == "ema_features"))
    if needs_ema:   # one EMA encoder for every EMA-target term
        shared["ema"] = EmaEncoder(model, cfg.repr_momentum)
    if any(w > 0 for w, _ in token_terms.values()) or cfg.repr_weight > 0:
        repr_masked = cfg.repr_weight > 0 and cfg.repr_corruption == "mask"
        shared["corruptor"] = Corruptor(model.clip.transformer.width, model.clip.visual.transformer.width,
                                        CorruptionConfig(cfg.text_mask_ratio, cfg.image_mask_ratio,
                                                         cfg.text_noise_ratio, cfg.image_noise_std),
                                        text_masks=cfg.mlm_weight > 0 or repr_masked or (cfg.mim_weight > 0 and conditioned),
                                        image_masks=cfg.mim_weight > 0 or repr_masked or (cfg.mlm_weight > 0 and conditioned),
                                        words=corpus_words)
    if cfg.itm_weight > 0 or cfg.repr_weight > 0:
        shared["fusion"] = FusionEncoder(model, cfg.fusion_layers, cfg.head_heads)
    for name, (weight, make) in token_terms.items():
        if weight > 0:
            parts[name], weights[name] = make(), weight
    if cfg.repr_weight > 0:
        parts["representation"] = RepresentationTarget(shared["fusion"], cfg.repr_momentum, cfg.repr_corruption,
                                                       cfg.repr_target)
        weights["representation"] = cfg.repr_weight
    return shared
