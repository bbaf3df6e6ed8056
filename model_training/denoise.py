"""Denoising objectives (the MAMO-line proposal in DESIGN.md) and masked representation modeling.

    from model_training.denoise import TextDenoising, ImageDenoising, RepresentationTarget
    TextDenoising(model, heads=2)(out)            # {"text_denoise_detect": BCE, "text_denoise_restore": CE}
    ImageDenoising(model, target="clean")(out)    # {"image_denoise": L1 to the clean pixels (or MSE to the noise)}
    RepresentationTarget(model, fusion, momentum=0.995, corruption="noise")(out)   # {"repr_noise": L2}

- Text denoising: a fraction of caption tokens is replaced by tokens drawn from the batch's captions
  (heads.Corruptor.replace_tokens). A one-layer head over the NOISY caption's states, with
  cross-attention to the complete image's [CLS, patches] (grounding helps tell a wrong word from a
  rare one), predicts per token whether it was replaced (BCE over all caption tokens) and the
  original token at replaced positions (CE through the tied token embedding).
- Image denoising: Gaussian noise at a fixed std; a SimMIM-style linear layer on the noisy image's
  patch states predicts the clean patch (L1) or the added noise (MSE: the noise is Gaussian, so the
  squared error is its natural loss, as in denoising diffusion), `target` picks which.
- Representation target: the fusion module's joint embeddings of (corrupted image, clean text) and
  (clean image, corrupted text) are pulled (squared L2 of unit vectors) to an EMA copy of encoder +
  fusion applied to (clean image, clean text). Corruption "noise" is representation denoising;
  "mask" is masked representation modeling (the masked views of heads.Views). The EMA target gets
  no gradient (a no_grad pass through frozen copies) and is updated after each optimizer step.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from model_training.heads import (CrossModalHead, TiedVocabDecoder, cosine_l2, l1_on, patchify, text_valid,
                                  word_positions)


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
    def __init__(self, model, target: str = "clean"):
        super().__init__()
        if target not in ("clean", "noise"):
            raise ValueError(f"image_denoise_target must be clean | noise, got {target!r}")
        visual = model.clip.visual
        self.target = target
        self.patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
        self.pixels = nn.Linear(visual.transformer.width, self.patch * self.patch * 3)

    def forward(self, out: dict) -> dict:
        views = out["views"]
        noisy = views.noisy()
        pred = self.pixels(noisy["image_tokens"])
        if self.target == "clean":
            return {"image_denoise": l1_on(pred, patchify(views.complete()["images"], self.patch))}
        return {"image_denoise": F.mse_loss(pred.float(), patchify(noisy["noise"], self.patch).float())}


class RepresentationTarget(nn.Module):
    def __init__(self, model, fusion, momentum: float, corruption: str):
        super().__init__()
        if corruption not in ("noise", "mask"):
            raise ValueError(f"repr_corruption must be noise | mask, got {corruption!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"repr_momentum must be in [0, 1), got {momentum}")
        self.momentum, self.corruption = momentum, corruption
        self.name = f"repr_{corruption}"
        self.ema_model = copy.deepcopy(model).requires_grad_(False)
        self.ema_fusion = copy.deepcopy(fusion).requires_grad_(False)

    @torch.no_grad()
    def target(self, images, texts) -> torch.Tensor:
        emb, tokens = self.ema_model.encode_image(images, return_tokens=True)
        _, txt_tokens = self.ema_model.encode_text(texts, return_tokens=True)
        return self.ema_fusion(emb, tokens, txt_tokens, text_valid(texts))

    @torch.no_grad()
    def momentum_update(self, model, fusion):
        for online, ema in ((model, self.ema_model), (fusion, self.ema_fusion)):
            for p_ema, p in zip(ema.parameters(), online.parameters()):
                p_ema.lerp_(p.detach(), 1.0 - self.momentum)

    def forward(self, out: dict) -> dict:
        views, fusion = out["views"], out["fusion"]
        full = views.complete()
        bad = views.noisy() if self.corruption == "noise" else views.masked()
        target = self.target(full["images"], full["texts"])
        # the corrupted text keeps its EOT/padding positions (masking and noise touch caption tokens only)
        bad_image = fusion(bad["image_emb"], bad["image_tokens"], full["text_tokens"], full["text_valid"])
        bad_text = fusion(full["image_emb"], full["image_tokens"], bad["text_tokens"], full["text_valid"])
        return {self.name: cosine_l2(bad_image, target) + cosine_l2(bad_text, target)}
