"""Shared pieces of the token-level objectives: cross-attention blocks, input corruption, and the
per-step cache of encoder passes ("views") that the masked / denoising / ITM heads read from.

    from model_training.heads import CrossModalHead, Corruptor, Views
    head = CrossModalHead(query_dim=64, kv_dim=64, cls_dim=64, heads=2)
    hidden, attn_cls = head(queries, query_valid, cls, kv_tokens, kv_valid)   # attn_cls: attention on the CLS

Why a Views cache: MLM and MIM (and masked representation modeling) must see the SAME masks in a
step, and the corrupted passes are the expensive part, so each corrupted pass runs at most once
per step and every head reads it from here. The complete pass is the one the contrastive loss
already ran (Trainee puts its tokens in the objective's input dict). Heads live in the objective,
not in DualEncoder, so they are dropped from the exported open_clip checkpoint by construction.

Image-side key/value sequences are [CLS, patch tokens]; the "CLS" given to a head is the joint
(L2-normalised) embedding the contrastive loss aligns, i.e. the instance representation (ConLIP).
Text-side sequences are [CLS, token states]; the text CLS is the pooled joint text embedding
(EOT under a causal mask, SOT for a bidirectional text tower).

EMA targets (representation denoising / masked representation modeling, multimodal image denoising,
MAMO's feature MIM) share ONE frozen EMA copy of the dual encoder (`EmaEncoder`, in the objective's
`shared`), whose clean pass runs once per step under no_grad (`Views.ema_complete`); a term that
also needs an EMA copy of its own head (the fusion module, the denoising head) keeps that copy itself.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SOT_ID, EOT_ID, PAD_ID = 49406, 49407, 0   # open_clip's BPE tokenizer


def text_valid(ids: torch.Tensor) -> torch.Tensor:
    """[B,L] ids -> bool [B,L]: SOT .. EOT inclusive (positions after EOT are padding)."""
    eot = ids.argmax(dim=-1, keepdim=True)              # open_clip's own EOT rule (EOT has the highest id)
    return torch.arange(ids.shape[1], device=ids.device)[None, :] <= eot


def word_positions(ids: torch.Tensor) -> torch.Tensor:
    """Positions that hold caption tokens (not SOT / EOT / padding): what masking and noise may touch."""
    return text_valid(ids) & (ids != SOT_ID) & (ids != EOT_ID)


def sample_exact(candidates: torch.Tensor, ratio: float, generator=None) -> torch.Tensor:
    """Per row, pick exactly max(1, round(ratio * n_candidates)) of the True positions (rows with
    no candidates stay all-False). Exact counts, not Bernoulli: the ratio is a property to test."""
    scores = torch.rand(candidates.shape, generator=generator, device="cpu").to(candidates.device)
    scores = scores.masked_fill(~candidates, 2.0)                   # non-candidates sort last
    n = candidates.sum(dim=1)
    k = torch.where(n > 0, (ratio * n.float()).round().long().clamp(min=1), torch.zeros_like(n))
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < k[:, None]) & candidates


def patch_size(model) -> int:
    patch = model.clip.visual.patch_size
    return patch[0] if isinstance(patch, tuple) else patch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B,3,H,W] -> [B, P, patch*patch*3] in the ViT's row-major patch order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class CrossModalHead(nn.Module):
    """One transformer layer: self-attention over the queries, cross-attention from the queries to
    [CLS, kv tokens] of the other modality, MLP (pre-norm, residual). Returns the hidden states and
    the head-averaged attention each query pays to the CLS (ConLIP's analysis statistic)."""

    def __init__(self, query_dim: int, kv_dim: int, cls_dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.kv_proj = nn.Linear(kv_dim, query_dim)
        self.cls_proj = nn.Linear(cls_dim, query_dim)
        self.ln_self, self.ln_cross, self.ln_kv, self.ln_mlp = (nn.LayerNorm(query_dim) for _ in range(4))
        self.self_attn = nn.MultiheadAttention(query_dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(query_dim, heads, batch_first=True)
        hidden = int(query_dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(query_dim, hidden), nn.GELU(), nn.Linear(hidden, query_dim))
        self.ln_out = nn.LayerNorm(query_dim)

    def forward(self, queries, query_valid, cls, kv_tokens, kv_valid=None):
        """queries [B,Lq,Dq], query_valid [B,Lq] bool, cls [B,Dc], kv_tokens [B,Lk,Dk], kv_valid [B,Lk]."""
        kv = torch.cat([self.cls_proj(cls)[:, None], self.kv_proj(kv_tokens)], dim=1)
        kv_pad = None
        if kv_valid is not None:
            kv_pad = ~torch.cat([torch.ones_like(kv_valid[:, :1]), kv_valid], dim=1)   # the CLS is never padding
        x = queries
        h = self.ln_self(x)
        x = x + self.self_attn(h, h, h, key_padding_mask=~query_valid, need_weights=False)[0]
        h = self.ln_cross(x)
        kv = self.ln_kv(kv)
        attended, weights = self.cross_attn(h, kv, kv, key_padding_mask=kv_pad, need_weights=True,
                                            average_attn_weights=True)
        x = x + attended
        x = x + self.mlp(self.ln_mlp(x))
        return self.ln_out(x), weights[..., 0]


def attention_stats(prefix: str, attn_cls: torch.Tensor, valid: torch.Tensor) -> dict:
    """Mean and std of the attention on the CLS over valid query positions; logged, never optimised."""
    vals = attn_cls.detach()[valid].float()
    return {f"stat_{prefix}_attn_cls_mean": vals.mean(), f"stat_{prefix}_attn_cls_std": vals.std(unbiased=False)}


class TiedVocabDecoder(nn.Module):
    """Token logits through the text encoder's own token embedding (BERT-style weight tying), so a
    49k-way output costs one transform layer and a bias, not a second vocabulary matrix."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        return self.transform(hidden) @ token_embedding.T + self.bias


class CorpusWords:
    """The training corpus's word vocabulary for word-level text noise: every word (a run of BPE tokens
    ending in an end-of-word token "...</w>", holding at least one letter) with its count, grouped by
    its number of tokens. Built once from caption strings (denoise.corpus_words_from_shards reads them
    from the training shards); `draw(n)` samples a word of n tokens with probability ~ its count."""

    def __init__(self, tokenizer, captions):
        self.ends_word = {i for i, piece in tokenizer.decoder.items() if piece.endswith("</w>")}   # sets: fast lookups
        self.has_letter = {i for i, piece in tokenizer.decoder.items()
                           if any(ch.isalpha() for ch in piece.replace("</w>", ""))}
        counts: dict[tuple, int] = {}
        for caption in captions:
            ids = tokenizer.encode(caption)
            for start, end in self._spans_of(ids):
                word = tuple(ids[start:end])
                counts[word] = counts.get(word, 0) + 1
        self.counts = counts
        by_len: dict[int, list] = {}
        for word, n in sorted(counts.items()):
            by_len.setdefault(len(word), []).append((word, n))
        self.words = {n: [w for w, _ in items] for n, items in by_len.items()}
        self.weights = {n: torch.tensor([c for _, c in items], dtype=torch.float) for n, items in by_len.items()}
        if not counts:
            raise ValueError("the corpus holds no words: text denoising needs captions to draw replacements from")

    def _spans_of(self, ids: list[int]) -> list[tuple[int, int]]:
        """[start, end) of each word in a list of caption token ids (a trailing cut-off word counts)."""
        spans, start = [], 0
        for pos, i in enumerate(ids):
            if i in self.ends_word or pos == len(ids) - 1:
                if any(j in self.has_letter for j in ids[start:pos + 1]):
                    spans.append((start, pos + 1))
                start = pos + 1
        return spans

    def spans(self, ids: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per row of [B,L] token ids, the word spans (positions) among its caption tokens."""
        out, words = [], word_positions(ids)
        for row, ok in zip(ids.tolist(), words.tolist()):
            first = ok.index(True) if True in ok else 0
            n = sum(ok)
            out.append([(first + a, first + b) for a, b in self._spans_of(row[first:first + n])])
        return out

    def draw(self, n_tokens: int) -> tuple | None:
        """A corpus word of n_tokens tokens, drawn by frequency (None when the corpus has none)."""
        if n_tokens not in self.weights:
            return None
        return self.words[n_tokens][int(torch.multinomial(self.weights[n_tokens], 1))]


@dataclass
class CorruptionConfig:
    text_mask_ratio: float = 0.15    # BERT / ConLIP
    image_mask_ratio: float = 0.5    # ConLIP's ConMIM ratio (SimMIM uses 0.6 with larger blocks)
    text_noise_ratio: float = 0.15   # fraction of caption words replaced by random corpus words
    image_noise_std: float = 0.5     # Gaussian noise std in normalised-pixel units (data std = 1)


class Corruptor(nn.Module):
    """Owns the learnable mask embeddings (dropped with the heads) and makes masked / noisy inputs."""

    def __init__(self, text_width: int, vision_width: int, cfg: CorruptionConfig, text_masks: bool = True,
                 image_masks: bool = True, words: "CorpusWords | None" = None):
        super().__init__()
        self.words = words
        for name in ("text_mask_ratio", "image_mask_ratio", "text_noise_ratio"):
            if not 0.0 < getattr(cfg, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(cfg, name)}")
        if cfg.image_noise_std <= 0:
            raise ValueError(f"image_noise_std must be > 0, got {cfg.image_noise_std}")
        self.cfg = cfg
        # created only where a masked view is used: a parameter outside the graph stalls DDP's reducer
        self.text_mask_embedding = nn.Parameter(torch.randn(text_width) * 0.02) if text_masks else None
        self.image_mask_token = nn.Parameter(torch.randn(vision_width) * 0.02) if image_masks else None

    def text_mask(self, ids):
        return sample_exact(word_positions(ids), self.cfg.text_mask_ratio)

    def patch_mask(self, batch: int, n_patches: int, device):
        return sample_exact(torch.ones(batch, n_patches, dtype=torch.bool, device=device), self.cfg.image_mask_ratio)

    def replace_words(self, ids):
        """Word-level text noise (the proposal): per caption, exactly max(1, round(text_noise_ratio x
        n_words)) whole words are chosen and each is replaced, all its BPE tokens, by a word drawn from
        the training corpus's word frequencies (self.words, a CorpusWords) among the corpus words with
        the same number of tokens, so positions stay aligned and every replaced token has an original to
        restore. Returns (noisy ids, replaced mask): every token of a replaced word is marked; a draw
        equal to the original word is not a replacement, so the detection target is exact."""
        if self.words is None:
            raise ValueError("text denoising needs the training corpus's word vocabulary (CorpusWords)")
        noisy, replaced = ids.clone(), torch.zeros_like(ids, dtype=torch.bool)
        rows = ids.cpu()
        for b, spans in enumerate(self.words.spans(rows)):
            if not spans:
                continue
            k = max(1, round(self.cfg.text_noise_ratio * len(spans)))
            for j in torch.randperm(len(spans))[:k].tolist():
                start, end = spans[j]
                draw = self.words.draw(end - start)
                if draw is None or draw == tuple(rows[b, start:end].tolist()):
                    continue
                noisy[b, start:end] = torch.tensor(draw, dtype=ids.dtype, device=ids.device)
                replaced[b, start:end] = True
        return noisy, replaced

    def add_noise(self, images):
        noise = torch.randn_like(images) * self.cfg.image_noise_std
        return images + noise, noise


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy that never receives gradients (the EMA side of a target)."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def ema_update_(ema: nn.Module, online: nn.Module, momentum: float):
    """ema <- momentum * ema + (1 - momentum) * online, parameter by parameter."""
    for p_ema, p in zip(ema.parameters(), online.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - momentum)


class EmaEncoder(nn.Module):
    """Frozen EMA copy of the dual encoder: the target network of every EMA-target term (MAMO uses
    0.995, slower than MoCo's 0.99, because the targets are dense features, not keys in a queue)."""

    def __init__(self, model: nn.Module, momentum: float):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"repr_momentum (EMA target factor) must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.model = frozen_copy(model)

    def update(self, online: nn.Module):
        ema_update_(self.model, online, self.momentum)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, texts: torch.Tensor) -> dict:
        img_emb, img_tok = self.model.encode_image(images, return_tokens=True)
        txt_emb, txt_tok = self.model.encode_text(texts, return_tokens=True)
        return {"image_emb": img_emb, "image_tokens": img_tok, "text_emb": txt_emb, "text_tokens": txt_tok,
                "text_valid": text_valid(texts)}


class Views:
    """One step's encoder passes, computed on first use and cached. `out` is the objective's input
    dict (Trainee fills model, images, texts and the complete pass's embeddings and tokens)."""

    def __init__(self, out: dict, corruptor: Corruptor | None, ema: EmaEncoder | None = None):
        self.out, self.corruptor, self.ema, self._cache = out, corruptor, ema, {}
        self.model = out["model"]

    def complete(self) -> dict:
        o = self.out
        return {"image_emb": o["image_emb_local"], "image_tokens": o["image_tokens"],
                "text_emb": o["text_emb_local"], "text_tokens": o["text_tokens"], "texts": o["texts"],
                "images": o["images"], "text_valid": text_valid(o["texts"])}

    def ema_complete(self) -> dict:
        """The EMA encoder's pass over the clean (image, text): targets, never differentiated."""
        if "ema" not in self._cache:
            self._cache["ema"] = self.ema.encode(self.out["images"], self.out["texts"])
        return self._cache["ema"]

    def masked_text(self) -> dict:
        if "masked_text" not in self._cache:
            texts, c = self.out["texts"], self.corruptor
            text_mask = c.text_mask(texts)
            emb, tok = self.model.encode_text(texts, return_tokens=True, token_mask=text_mask,
                                              mask_embedding=c.text_mask_embedding)
            self._cache["masked_text"] = {"text_mask": text_mask, "text_emb": emb, "text_tokens": tok}
        return self._cache["masked_text"]

    def masked_image(self) -> dict:
        if "masked_image" not in self._cache:
            images, c = self.out["images"], self.corruptor
            patch_mask = c.patch_mask(images.shape[0], self.out["image_tokens"].shape[1], images.device)
            emb, tok = self.model.encode_image(images, return_tokens=True, patch_mask=patch_mask,
                                               mask_token=c.image_mask_token)
            self._cache["masked_image"] = {"patch_mask": patch_mask, "image_emb": emb, "image_tokens": tok}
        return self._cache["masked_image"]

    def masked(self) -> dict:
        """Both modalities masked (the same masks the MLM/MIM heads see in this step)."""
        return {**self.masked_text(), **self.masked_image()}

    def noisy(self) -> dict:
        if "noisy" not in self._cache:
            images, texts, c = self.out["images"], self.out["texts"], self.corruptor
            noisy_images, noise = c.add_noise(images)
            noisy_texts, replaced = c.replace_words(texts)
            img_emb, img_tok = self.model.encode_image(noisy_images, return_tokens=True)
            txt_emb, txt_tok = self.model.encode_text(noisy_texts, return_tokens=True)
            self._cache["noisy"] = {"noise": noise, "noisy_texts": noisy_texts, "replaced": replaced,
                                    "image_emb": img_emb, "image_tokens": img_tok, "text_emb": txt_emb,
                                    "text_tokens": txt_tok}
        return self._cache["noisy"]


def l1_on(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error over the selected patches ([B,P] mask) and all their pixel values."""
    err = (pred.float() - target.float()).abs().mean(dim=-1)
    return err.mean() if mask is None else (err * mask).sum() / mask.sum().clamp(min=1)


def cosine_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared L2 between L2-normalised vectors (= 2 - 2 cos), mean over the batch."""
    return (F.normalize(pred.float(), dim=-1) - F.normalize(target.float(), dim=-1)).pow(2).sum(-1).mean()
