"""Masked language / image modeling heads: vanilla (MLM, MIM) and conditioned (ConLIP's ConMLM, ConMIM).

    from model_training.masked import MaskedLanguageModeling, MaskedImageModeling
    mlm = MaskedLanguageModeling(model, heads=2, conditioned=True)    # ConMLM
    terms = mlm(out)    # {"conmlm": CE on masked tokens, "stat_conmlm_attn_cls_mean": ..., ...}

Both read the step's passes from out["views"] (model_training/heads.py):
- MLM queries: the text encoder's states of the MASKED caption (15% of caption tokens replaced by a
  learned mask embedding). Keys/values: image [CLS, patches].
    vanilla:     CLS and patches from the COMPLETE image (the head can read the answer off the patches).
    conditioned: CLS from the COMPLETE image, patches from the MASKED image (ConLIP): whatever the
                 masked patches lost must come through the instance representation.
  Output: tokens predicted through the tied token embedding; CE on masked positions only.
- MIM queries: patch states of the MASKED image (50% of patches replaced by a learned mask token).
  Keys/values: text [CLS, tokens], complete (vanilla) or CLS complete + tokens masked (conditioned).
  Output, by `target`:
    pixels:       a SimMIM-style linear layer to the patch's pixels; L1 on the normalised input pixels
                  of masked patches only (ConLIP's ConMIM; the input is normalised by the data mean/std).
    ema_features: a linear layer to the vision width; L1 on masked patches to the EMA encoder's
                  visual tokens of the CLEAN image (MAMO: predict high-level features, not pixels;
                  the target gets no gradient).
Each returns the ConLIP attention statistic (attention from queries to the other modality's CLS).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_training.heads import CrossModalHead, TiedVocabDecoder, attention_stats, l1_on, patch_size, patchify


def _widths(model) -> tuple[int, int]:
    return model.clip.transformer.width, model.clip.visual.transformer.width


class MaskedLanguageModeling(nn.Module):
    def __init__(self, model, heads: int, conditioned: bool):
        super().__init__()
        text_w, vision_w = _widths(model)
        self.conditioned = conditioned
        self.name = "conmlm" if conditioned else "mlm"
        self.head = CrossModalHead(text_w, vision_w, model.embed_dim, heads)
        self.decoder = TiedVocabDecoder(text_w, model.clip.token_embedding.num_embeddings)

    def forward(self, out: dict) -> dict:
        views = out["views"]
        full, masked = views.complete(), views.masked_text()
        image_tokens = views.masked_image()["image_tokens"] if self.conditioned else full["image_tokens"]
        hidden, attn_cls = self.head(masked["text_tokens"], full["text_valid"], full["image_emb"], image_tokens)
        where = masked["text_mask"]
        logits = self.decoder(hidden[where], views.model.clip.token_embedding.weight)
        loss = F.cross_entropy(logits.float(), full["texts"][where])
        return {self.name: loss, **attention_stats(self.name, attn_cls, full["text_valid"])}


class MaskedImageModeling(nn.Module):
    def __init__(self, model, heads: int, conditioned: bool, target: str = "pixels"):
        super().__init__()
        if target not in ("pixels", "ema_features"):
            raise ValueError(f"mim_target must be pixels | ema_features, got {target!r}")
        text_w, vision_w = _widths(model)
        self.conditioned, self.target = conditioned, target
        self.name = "conmim" if conditioned else "mim"
        self.patch = patch_size(model)
        self.head = CrossModalHead(vision_w, text_w, model.embed_dim, heads)
        # both decoders are one linear layer (SimMIM / MAMO keep the decoder light)
        self.decoder = nn.Linear(vision_w, self.patch * self.patch * 3 if target == "pixels" else vision_w)

    def forward(self, out: dict) -> dict:
        views = out["views"]
        full, masked = views.complete(), views.masked_image()
        text_tokens = views.masked_text()["text_tokens"] if self.conditioned else full["text_tokens"]
        patches = masked["image_tokens"]
        valid = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        hidden, attn_cls = self.head(patches, valid, full["text_emb"], text_tokens, full["text_valid"])
        goal = (patchify(full["images"], self.patch) if self.target == "pixels"
                else views.ema_complete()["image_tokens"])
        loss = l1_on(self.decoder(hidden), goal, masked["patch_mask"])
        return {self.name: loss, **attention_stats(self.name, attn_cls, valid)}
