"""Image-text matching with in-batch hard negatives (ALBEF-style), and the fusion module it trains.

    from model_training.itm import FusionEncoder, ImageTextMatching, sample_hard_negatives
    fusion = FusionEncoder(model, layers=2, heads=2)       # (image, text) -> joint embedding [B, width]
    terms = ImageTextMatching(model)(out)                  # needs out["fusion"], out["views"]

FusionEncoder: a learned joint token is prepended to the text encoder's token states; `layers`
blocks of self-attention (joint + text) and cross-attention to the image's [CLS, patches]; the
joint token's output is the pair's joint embedding. It is light (one or two blocks) because the
dual encoder is what gets exported; the fusion module is dropped after pre-training.

ITM (ALBEF, MAMO): for each image one negative text, and for each text one negative image, are drawn
from the in-batch similarity distribution softmax(s / T) with the positive excluded, so negatives
are hard but not always the hardest (which are often false negatives). A binary classifier on the
joint embedding, cross-entropy over the B positive and 2B negative pairs (label 1 = matched,
0 = not matched): a wrong image and a wrong text are the same event, "this pair does not match".
Negatives are drawn within the local micro-batch (tokens are not gathered across ranks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_training.heads import CrossModalHead

NO_MATCH, MATCH = 0, 1


class FusionEncoder(nn.Module):
    def __init__(self, model, layers: int, heads: int):
        super().__init__()
        if layers < 1:
            raise ValueError(f"fusion_layers must be >= 1, got {layers}")
        text_w, vision_w = model.clip.transformer.width, model.clip.visual.transformer.width
        self.width = text_w
        self.joint_token = nn.Parameter(torch.randn(text_w) * 0.02)
        self.blocks = nn.ModuleList(CrossModalHead(text_w, vision_w, model.embed_dim, heads) for _ in range(layers))

    def forward(self, image_emb, image_tokens, text_tokens, text_valid, return_tokens: bool = False) -> torch.Tensor:
        """The joint embedding [B, width], or with return_tokens every output token [B, 1 + L, width]
        (the joint token, then the text positions: MAMO's multimodal token representations)."""
        b = text_tokens.shape[0]
        x = torch.cat([self.joint_token.to(text_tokens.dtype).expand(b, 1, -1), text_tokens], dim=1)
        valid = torch.cat([torch.ones_like(text_valid[:, :1]), text_valid], dim=1)
        for block in self.blocks:
            x, _ = block(x, valid, image_emb, image_tokens)
        return x if return_tokens else x[:, 0]


@torch.no_grad()
def sample_hard_negatives(sim: torch.Tensor, temperature_scale: float | torch.Tensor) -> torch.Tensor:
    """sim [B,B] (rows = queries): for each row one column j != i, drawn with p ~ exp(scale * s_ij)."""
    if sim.shape[0] < 2:
        raise ValueError("ITM hard negatives need a batch of at least 2 pairs")
    logits = (sim.float() * temperature_scale).masked_fill(torch.eye(sim.shape[0], dtype=torch.bool,
                                                                     device=sim.device), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=1), 1).squeeze(1)


class ImageTextMatching(nn.Module):
    name = "itm"

    def __init__(self, model):
        super().__init__()
        self.classifier = nn.Linear(model.clip.transformer.width, 2)   # ALBEF's itm_head

    def forward(self, out: dict) -> dict:
        full, fusion = out["views"].complete(), out["fusion"]
        img_emb, img_tok, txt_tok, txt_valid = (full["image_emb"], full["image_tokens"], full["text_tokens"],
                                                full["text_valid"])
        sim = img_emb.detach() @ full["text_emb"].detach().T
        scale = out["logit_scale"].detach()
        neg_image_of_text = sample_hard_negatives(sim.T, scale)     # text i paired with a wrong image
        neg_text_of_image = sample_hard_negatives(sim, scale)       # image i paired with a wrong text
        b = img_emb.shape[0]
        joint = fusion(torch.cat([img_emb, img_emb[neg_image_of_text], img_emb]),
                       torch.cat([img_tok, img_tok[neg_image_of_text], img_tok]),
                       torch.cat([txt_tok, txt_tok, txt_tok[neg_text_of_image]]),
                       torch.cat([txt_valid, txt_valid, txt_valid[neg_text_of_image]]))
        labels = torch.tensor([MATCH, NO_MATCH, NO_MATCH], device=joint.device).repeat_interleave(b)
        logits = self.classifier(joint).float()
        return {"itm": F.cross_entropy(logits, labels),
                "stat_itm_accuracy": (logits.argmax(1) == labels).float().mean().detach()}
