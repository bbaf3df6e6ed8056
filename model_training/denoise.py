"""Denoising objectives (the MAMO-line proposal in DESIGN.md) and masked representation modeling.

    from model_training.denoise import TextDenoising, ImageDenoising, RepresentationTarget
    TextDenoising(model, heads=2)(out)            # {"text_denoise_detect": BCE, "text_denoise_restore": CE}
    ImageDenoising(model, heads=2, target="ema", momentum=0.995)(out)   # {"image_denoise": L1 to the EMA target}
    RepresentationTarget(fusion, momentum=0.995, corruption="noise")(out)   # {"repr_noise": L2}

- Text denoising: a fraction of caption tokens is replaced by tokens drawn from the batch's captions
  (heads.Corruptor.replace_tokens). A one-layer head over the NOISY caption's states, with
  cross-attention to the complete image's [CLS, patches] (grounding helps tell a wrong word from a
  rare one), predicts per token whether it was replaced (BCE over all caption tokens) and the
  original token at replaced positions (CE through the tied token embedding).
- Image denoising through the multimodal embedding (target "ema", the proposal): Gaussian noise at a
  fixed std; the NOISY image's patch states attend to the clean text ([text CLS, text tokens] of the
  complete pass) in a one-layer cross-modal head, and a linear layer gives the reconstruction. The
  target is the same reconstruction by the EMA model (EMA encoder + EMA head) from (clean image,
  clean text), computed without gradient; L1 over all patches (noise touches every patch). A
  stat_image_denoise_target_std term is logged: a target that collapses to a constant shows there.
  Kept for comparison, named as what it is: the UNIMODAL pixel variant ("clean" / "noise"), a
  SimMIM-style linear layer on the noisy image's own tokens (no text, no EMA) predicting the clean
  patch (L1) or the added noise (MSE, as in denoising diffusion); its term is image_denoise_unimodal_<target>.
- Representation target: the fusion module's joint embeddings of (corrupted image, clean text) and
  (clean image, corrupted text) are pulled (squared L2 of unit vectors) to the EMA encoder + EMA
  fusion applied to (clean image, clean text). Corruption "noise" is representation denoising;
  "mask" is masked representation modeling (the masked views of heads.Views). The EMA targets get
  no gradient (no_grad passes through frozen copies) and are updated after each optimizer step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_training.heads import (CrossModalHead, TiedVocabDecoder, cosine_l2, ema_update_, frozen_copy, l1_on,
                                  patch_size, patchify, word_positions)


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
        if target == "ema":
            self.name = "image_denoise"
            self.head = CrossModalHead(vision_w, text_w, model.embed_dim, heads)
            self.decoder = nn.Linear(vision_w, vision_w)
            self.ema_head, self.ema_decoder = frozen_copy(self.head), frozen_copy(self.decoder)
        else:
            self.name = f"image_denoise_unimodal_{target}"
            self.decoder = nn.Linear(vision_w, self.patch * self.patch * 3)

    @staticmethod
    def reconstruct(head, decoder, patch_tokens, text: dict) -> torch.Tensor:
        """Patch states [B,P,W] attending to [text CLS, text tokens] -> reconstruction [B,P,W]."""
        valid = torch.ones(patch_tokens.shape[:2], dtype=torch.bool, device=patch_tokens.device)
        hidden, _ = head(patch_tokens, valid, text["text_emb"], text["text_tokens"], text["text_valid"])
        return decoder(hidden)

    def update_ema_heads(self, shared):
        if self.target == "ema":
            ema_update_(self.ema_head, self.head, self.momentum)
            ema_update_(self.ema_decoder, self.decoder, self.momentum)

    def forward(self, out: dict) -> dict:
        views = out["views"]
        noisy = views.noisy()
        if self.target == "ema":
            pred = self.reconstruct(self.head, self.decoder, noisy["image_tokens"], views.complete())
            ema = views.ema_complete()
            with torch.no_grad():
                target = self.reconstruct(self.ema_head, self.ema_decoder, ema["image_tokens"], ema)
            return {self.name: l1_on(pred, target),
                    "stat_image_denoise_target_std": target.float().std(dim=1).mean()}
        pred = self.decoder(noisy["image_tokens"])
        if self.target == "clean":
            return {self.name: l1_on(pred, patchify(views.complete()["images"], self.patch))}
        return {self.name: F.mse_loss(pred.float(), patchify(noisy["noise"], self.patch).float())}


class RepresentationTarget(nn.Module):
    def __init__(self, fusion, momentum: float, corruption: str):
        super().__init__()
        if corruption not in ("noise", "mask"):
            raise ValueError(f"repr_corruption must be noise | mask, got {corruption!r}")
        self.momentum, self.corruption = momentum, corruption
        self.name = f"repr_{corruption}"
        self.ema_fusion = frozen_copy(fusion)

    @torch.no_grad()
    def target(self, views) -> torch.Tensor:
        ema = views.ema_complete()
        return self.ema_fusion(ema["image_emb"], ema["image_tokens"], ema["text_tokens"], ema["text_valid"])

    def update_ema_heads(self, shared):
        ema_update_(self.ema_fusion, shared["fusion"], self.momentum)

    def forward(self, out: dict) -> dict:
        views, fusion = out["views"], out["fusion"]
        full = views.complete()
        bad = views.noisy() if self.corruption == "noise" else views.masked()
        target = self.target(views)
        # the corrupted text keeps its EOT/padding positions (masking and noise touch caption tokens only)
        bad_image = fusion(bad["image_emb"], bad["image_tokens"], full["text_tokens"], full["text_valid"])
        bad_text = fusion(full["image_emb"], full["image_tokens"], bad["text_tokens"], full["text_valid"])
        return {self.name: cosine_l2(bad_image, target) + cosine_l2(bad_text, target)}
