"""Denoising objectives (the MAMO-line proposal in DESIGN.md) and masked representation modeling.

    from model_training.denoise import TextDenoising, ImageDenoising, RepresentationTarget
    TextDenoising(model, heads=2)(out)            # {"text_denoise_detect": BCE, "text_denoise_restore": CE}
    ImageDenoising(model, heads=2, target="ema", momentum=0.995)(out)   # {"image_denoise": ..., "image_denoise_anchor": ...}
    RepresentationTarget(fusion, momentum=0.995, corruption="noise")(out)   # {"repr_noise": L2}

- Text denoising: a fraction of the caption's WORDS is replaced, all tokens of each, by words drawn
  from the training corpus's word frequencies (heads.CorpusWords, built once from the training shards
  by corpus_words_from_shards; a replacement has the same number of BPE tokens as the word it
  replaces, so positions stay aligned). A one-layer head over the NOISY caption's states, with
  cross-attention to the complete image's [CLS, patches] (grounding helps tell a wrong word from a
  rare one), predicts per token whether its word was replaced (BCE over all caption tokens) and the
  original tokens of the replaced words (CE through the tied token embedding).
- Image denoising through the multimodal head (target "ema", the proposal): Gaussian noise at a fixed
  std. The image's patch states attend to the clean text ([text CLS, text tokens] of the complete
  pass) in a one-layer cross-modal head, and a SimMIM-style linear layer decodes each patch to its
  patch x patch x 3 pixels. Two terms, both L1 over all patches:
    image_denoise_anchor  the CLEAN image's reconstruction vs the clean patches (the pixel anchor: a
                          zero decoder is not a fixed point, the head must reconstruct pixels)
    image_denoise         the NOISY image's reconstruction vs the EMA model's (EMA encoder + EMA head
                          + EMA decoder) reconstruction from (clean image, clean text), no gradient.
  A stat_image_denoise_target_std term is logged: a target that collapses to a constant shows there.
  Kept for comparison, named as what it is: the UNIMODAL pixel variant ("clean" / "noise"), a
  SimMIM-style linear layer on the noisy image's own tokens (no text, no EMA) predicting the clean
  patch (L1) or the added noise (MSE, as in denoising diffusion); its term is image_denoise_unimodal_<target>.
- Representation target (MAMO): the fusion module's multimodal TOKEN representations (joint token +
  text positions) of (corrupted image, clean text) and (clean image, corrupted text) are regressed
  onto the EMA encoder + EMA fusion's tokens for (clean image, clean text) with plain L2 (mean squared
  error per coordinate, averaged over valid positions): target "tokens". Target "pooled_cosine" keeps
  the earlier form, squared L2 between the L2-normalised joint embeddings (= 2 - 2 cos), as a named
  option. Corruption "noise" is representation denoising; "mask" is masked representation modeling
  (the masked views of heads.Views). The EMA targets get no gradient (no_grad passes through frozen
  copies) and are updated after each optimizer step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_training.heads import (CorpusWords, CrossModalHead, TiedVocabDecoder, cosine_l2, ema_update_, frozen_copy,
                                  l1_on, patch_size, patchify, word_positions)


class TextDenoising(nn.Module):
    def __init__(self, model, heads: int):
        super().__init__()
        text_w, vision_w = model.clip.transformer.width, model.clip.visual.transformer.width
        self.head = CrossModalHead(text_w, vision_w, model.embed_dim, heads)
        self.detect = nn.Linear(text_w, 1)
        self.decoder = TiedVocabDecoder(text_w, model.clip.token_embedding.num_embeddings)

    def forward(self, out: dict) -> dict:
        views = out["views"]
        full, noisy = views.complete(), views.noisy()
        hidden, _ = self.head(noisy["text_tokens"], full["text_valid"], full["image_emb"], full["image_tokens"])
        words, replaced = word_positions(full["texts"]), noisy["replaced"]
        detect = F.binary_cross_entropy_with_logits(self.detect(hidden[words]).squeeze(-1).float(),
                                                    replaced[words].float())
        if replaced.any():
            logits = self.decoder(hidden[replaced], views.model.clip.token_embedding.weight)
            restore = F.cross_entropy(logits.float(), full["texts"][replaced])
        else:   # keeps the decoder in the graph (DDP needs every parameter used) with a zero term
            restore = 0.0 * self.decoder(hidden[:1, 0], views.model.clip.token_embedding.weight).sum()
        return {"text_denoise_detect": detect, "text_denoise_restore": restore}


class ImageDenoising(nn.Module):
    def __init__(self, model, heads: int, target: str = "ema", momentum: float = 0.995):
        super().__init__()
        if target not in ("ema", "clean", "noise"):
            raise ValueError(f"image_denoise_target must be ema | clean | noise, got {target!r}")
        text_w, vision_w = model.clip.transformer.width, model.clip.visual.transformer.width
        self.target, self.momentum, self.patch = target, momentum, patch_size(model)
        self.decoder = nn.Linear(vision_w, self.patch * self.patch * 3)   # SimMIM: one linear layer to pixels
        if target == "ema":
            self.name = "image_denoise"
            self.head = CrossModalHead(vision_w, text_w, model.embed_dim, heads)
            self.ema_head, self.ema_decoder = frozen_copy(self.head), frozen_copy(self.decoder)
        else:
            self.name = f"image_denoise_unimodal_{target}"

    @staticmethod
    def reconstruct(head, decoder, patch_tokens, text: dict) -> torch.Tensor:
        """Patch states [B,P,W] attending to [text CLS, text tokens] -> pixels [B, P, patch*patch*3]."""
        valid = torch.ones(patch_tokens.shape[:2], dtype=torch.bool, device=patch_tokens.device)
        hidden, _ = head(patch_tokens, valid, text["text_emb"], text["text_tokens"], text["text_valid"])
        return decoder(hidden)

    def update_ema_heads(self, shared):
        if self.target == "ema":
            ema_update_(self.ema_head, self.head, self.momentum)
            ema_update_(self.ema_decoder, self.decoder, self.momentum)

    def forward(self, out: dict) -> dict:
        views = out["views"]
        noisy, full = views.noisy(), views.complete()
        clean_patches = patchify(full["images"], self.patch)
        if self.target == "ema":
            anchor = self.reconstruct(self.head, self.decoder, full["image_tokens"], full)
            pred = self.reconstruct(self.head, self.decoder, noisy["image_tokens"], full)
            ema = views.ema_complete()
            with torch.no_grad():
                target = self.reconstruct(self.ema_head, self.ema_decoder, ema["image_tokens"], ema)
            return {self.name: l1_on(pred, target), f"{self.name}_anchor": l1_on(anchor, clean_patches),
                    "stat_image_denoise_target_std": target.float().std(dim=1).mean()}
        pred = self.decoder(noisy["image_tokens"])
        if self.target == "clean":
            return {self.name: l1_on(pred, clean_patches)}
        return {self.name: F.mse_loss(pred.float(), patchify(noisy["noise"], self.patch).float())}


def token_l2(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Plain L2 between token representations: squared error per coordinate, averaged over the
    coordinates and the valid positions ([B,L] mask) of the batch."""
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (err * valid).sum() / valid.sum().clamp(min=1)


class RepresentationTarget(nn.Module):
    def __init__(self, fusion, momentum: float, corruption: str, target: str = "tokens"):
        super().__init__()
        if corruption not in ("noise", "mask"):
            raise ValueError(f"repr_corruption must be noise | mask, got {corruption!r}")
        if target not in ("tokens", "pooled_cosine"):
            raise ValueError(f"repr_target must be tokens | pooled_cosine, got {target!r}")
        self.momentum, self.corruption, self.kind = momentum, corruption, target
        self.name = f"repr_{corruption}" if target == "tokens" else f"repr_{corruption}_pooled_cosine"
        self.ema_fusion = frozen_copy(fusion)

    @torch.no_grad()
    def target(self, views) -> torch.Tensor:
        ema = views.ema_complete()
        return self.ema_fusion(ema["image_emb"], ema["image_tokens"], ema["text_tokens"], ema["text_valid"],
                               return_tokens=True)

    def update_ema_heads(self, shared):
        ema_update_(self.ema_fusion, shared["fusion"], self.momentum)

    def forward(self, out: dict) -> dict:
        views, fusion = out["views"], out["fusion"]
        full = views.complete()
        bad = views.noisy() if self.corruption == "noise" else views.masked()
        target = self.target(views)                                      # [B, 1 + L, W]: joint token + text positions
        # the corrupted text keeps its EOT/padding positions (masking and noise touch caption tokens only)
        bad_image = fusion(bad["image_emb"], bad["image_tokens"], full["text_tokens"], full["text_valid"],
                           return_tokens=True)
        bad_text = fusion(full["image_emb"], full["image_tokens"], bad["text_tokens"], full["text_valid"],
                          return_tokens=True)
        if self.kind == "pooled_cosine":
            return {self.name: cosine_l2(bad_image[:, 0], target[:, 0]) + cosine_l2(bad_text[:, 0], target[:, 0])}
        valid = torch.cat([torch.ones_like(full["text_valid"][:, :1]), full["text_valid"]], dim=1)
        return {self.name: token_l2(bad_image, target, valid) + token_l2(bad_text, target, valid)}


def corpus_words_from_shards(shards: list[str], tokenizer, holdout_fraction: float = 0.0,
                             max_captions: int = 200_000) -> CorpusWords:
    """The word vocabulary of the training captions (held-out keys excluded), read once from the shards
    (Parquet: the key and caption columns only; tar: the .txt members), at most max_captions of them in
    shard order (a sample that is plenty for word frequencies)."""
    from model_training.data import CAPTION, KEY, _tar_rows, is_holdout
    from pipeline.store import storage

    captions = []
    for path in shards:
        if path.endswith(".tar"):
            rows = ((r[0], r[1]) for r in _tar_rows(path) if not isinstance(r, str))
        else:
            rows = (pair for rb in storage.parquet_file(path).iter_batches(batch_size=4096, columns=[KEY, CAPTION])
                    for pair in zip(rb.column(KEY).to_pylist(), rb.column(CAPTION).to_pylist()))
        for key, caption in rows:
            if caption and key and not is_holdout(key, holdout_fraction):
                captions.append(caption)
                if len(captions) >= max_captions:
                    return CorpusWords(tokenizer, captions)
    return CorpusWords(tokenizer, captions)
