"""DiHT concept distillation: linear concept classifiers on frozen teacher embeddings -> top-k labels.

    from pipeline.distill import DistillConfig, train_head, topk_labels, is_heldout
    cfg = DistillConfig(k=10)
    head = train_head(X, offsets, indices, n_classes, train_rows, cfg)   # soft-target CE, sqrt upsampling
    report = evaluate_head(head, X, offsets, indices, heldout_rows, train_counts)
    idx, probs = topk_labels(head.logits(X), cfg.k)      # int32 [n, k] sorted desc, float32 summing to 1

The classifiers are trained on one node (embeddings are small: 1,280 float32 per image for the
default teacher); jobs/distill_labels.py runs the teacher and the labelling in Spark executors.
Everything is seeded and single-process, so the same embeddings give bit-identical labels.

Held-out split: by a hash of the split id (the image's content hash), so rows that share an image
(several captions of one picture) fall on the same side and the held-out images are truly unseen.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.concepts import dense_soft_targets


@dataclass(frozen=True)
class DistillConfig:
    k: int = 10                     # labels kept per image and head (DiHT stores a sparse top-k)
    heldout_fraction: float = 0.1   # images held out (by content hash) to report accuracy
    seed: int = 0                   # sampling order and initialisation; same seed -> same labels
    epochs: int = 30                # passes over the (upsampled) training rows ...
    min_steps: int = 300            # ... but at least this many steps, so small sets converge too
    batch_size: int = 256
    lr: float = 1e-2                # AdamW on L2-normalised embeddings (unit-norm inputs)
    weight_decay: float = 1e-4
    sqrt_upsampling: bool = True    # DiHT: square-root upsampling of low-frequency concepts
    normalize_embeddings: bool = True  # L2-normalise teacher embeddings (scale-free linear probe)


def split_id_of(image_bytes: bytes | None, key: str) -> str:
    """What the held-out split hashes: the image content, or the key when there is no image."""
    return hashlib.sha256(image_bytes).hexdigest() if image_bytes else f"key:{key}"


def is_heldout(split_id: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic, order-free membership of the held-out split."""
    h = hashlib.sha256(f"{seed}:{split_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def sqrt_sampling_weights(offsets: np.ndarray, indices: np.ndarray, rows: np.ndarray,
                          counts: np.ndarray) -> np.ndarray:
    """Per-row sampling weights for square-root upsampling of rare concepts.

    Sampling a concept with probability ~ sqrt(freq) and then a row containing it uniformly gives
    a row the probability sum_c t_c * sqrt(f_c) / f_c = sum_c t_c / sqrt(f_c), with t the row's
    soft target (Mahajan et al. 2018, as used by DiHT). Normalised to mean 1.
    """
    inv_sqrt = 1.0 / np.sqrt(np.maximum(counts, 1).astype(np.float64))
    w = np.empty(len(rows), dtype=np.float64)
    for j, r in enumerate(rows):
        idx = indices[offsets[r]:offsets[r + 1]]
        w[j] = inv_sqrt[idx].mean()
    return w / w.mean()


def prepare_embeddings(X: np.ndarray, config: DistillConfig) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    if config.normalize_embeddings:
        x = torch.nn.functional.normalize(x, dim=1)
    return x


@dataclass
class LinearHead:
    weight: np.ndarray   # [n_classes, D] float32
    bias: np.ndarray     # [n_classes] float32
    normalize_embeddings: bool

    @torch.no_grad()
    def logits(self, X: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        if self.normalize_embeddings:
            x = torch.nn.functional.normalize(x, dim=1)
        return x @ torch.from_numpy(self.weight).T + torch.from_numpy(self.bias)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


def train_head(X: np.ndarray, offsets: np.ndarray, indices: np.ndarray, n_classes: int,
               train_rows: np.ndarray, config: DistillConfig) -> tuple[LinearHead, dict]:
    """Train one linear classifier with soft-target CE on rows that have >= 1 concept."""
    train_rows = np.asarray([r for r in train_rows if offsets[r + 1] > offsets[r]], dtype=np.int64)
    if len(train_rows) == 0:
        raise ValueError("no training rows with an in-vocabulary concept")
    counts = np.bincount(indices[np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in train_rows])],
                         minlength=n_classes)
    if config.sqrt_upsampling:
        weights = torch.from_numpy(sqrt_sampling_weights(offsets, indices, train_rows, counts))
    else:
        weights = torch.ones(len(train_rows), dtype=torch.float64)

    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    x_all = prepare_embeddings(X[train_rows], config)
    t_all = torch.from_numpy(dense_soft_targets(offsets, indices, train_rows, n_classes))
    layer = torch.nn.Linear(x_all.shape[1], n_classes)
    torch.nn.init.zeros_(layer.weight)  # convex problem: a fixed start keeps runs reproducible
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.AdamW(layer.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    batch = min(config.batch_size, len(train_rows))
    steps_per_epoch = -(-len(train_rows) // batch)
    steps = max(config.min_steps, config.epochs * steps_per_epoch)
    losses = []
    for step in range(steps):
        # upsampling = drawing rows with replacement in proportion to their weights
        pick = torch.multinomial(weights, batch, replacement=True, generator=gen)
        loss = soft_cross_entropy(layer(x_all[pick]), t_all[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    head = LinearHead(layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy(),
                      config.normalize_embeddings)
    tail = losses[-steps_per_epoch:]
    return head, {"n_train_rows": int(len(train_rows)), "steps": steps, "batch_size": batch,
                  "final_loss": float(np.mean(tail)), "train_concept_counts": counts}


def _hit_rate(ranked: np.ndarray, offsets: np.ndarray, indices: np.ndarray, rows: np.ndarray, k: int
              ) -> float:
    hits = [bool(set(ranked[j, :k].tolist()) & set(indices[offsets[r]:offsets[r + 1]].tolist()))
            for j, r in enumerate(rows)]
    return float(np.mean(hits)) if hits else float("nan")


def evaluate_head(head: LinearHead, X: np.ndarray, offsets: np.ndarray, indices: np.ndarray,
                  heldout_rows: np.ndarray, train_counts: np.ndarray) -> dict:
    """Held-out top-1/top-5 accuracy (a hit = a predicted concept is among the row's caption
    concepts) next to the frequency baseline (always predicting the most frequent training
    concepts)."""
    rows = np.asarray([r for r in heldout_rows if offsets[r + 1] > offsets[r]], dtype=np.int64)
    report = {"n_heldout_rows": int(len(rows))}
    if len(rows) == 0:
        return report
    ranked = np.argsort(-head.logits(X[rows]).numpy(), axis=1, kind="stable")[:, :5]
    baseline = np.argsort(-train_counts, kind="stable")[:5]
    baseline = np.broadcast_to(baseline, (len(rows), len(baseline)))
    for k in (1, 5):
        report[f"top{k}"] = _hit_rate(ranked, offsets, indices, rows, k)
        report[f"baseline_top{k}"] = _hit_rate(baseline, offsets, indices, rows, k)
    return report


def topk_labels(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax, keep the k largest, renormalise to sum 1. Indices int32 sorted by probability
    (descending, ties by index), probabilities float32."""
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, order, axis=1)
    top = top / top.sum(axis=1, keepdims=True)
    return order.astype(np.int32), top.astype(np.float32)


def label_bytes(k: int, n_objects: int, n_attributes: int) -> dict:
    """Storage per sample of the sparse labels (int32 index + float32 prob per kept concept, per
    head) against dense float32 vectors over both vocabularies, before Parquet compression."""
    sparse = 2 * k * (4 + 4)
    dense = 4 * (n_objects + n_attributes)
    return {"sparse_bytes_per_sample": sparse, "dense_float32_bytes_per_sample": dense,
            "ratio_dense_over_sparse": dense / sparse}
