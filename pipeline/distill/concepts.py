"""Object and attribute vocabularies from caption parses, and per-row soft concept targets (DiHT).

    from pipeline.distill.concepts import VocabConfig, count_concepts, build_vocabularies, row_concepts
    counts = count_concepts(shard_tables)                  # Counters of objects / attribute words
    vocabs = build_vocabularies(counts, VocabConfig(min_count=2))
    write_vocab_json(vocabs, "LABELS/vocab.json", config)
    objs, attrs = row_concepts(row["objects"], row["attributes"])
    targets = vocabs["objects"].encode(objs)               # sorted unique vocabulary indices

Concepts are the lemmas the caption parser (pipeline/filter/captions.py) writes into the shards'
`objects` and `attributes` columns; here they are only normalised (lower case, trimmed, inner
whitespace collapsed), so the vocabulary matches what the parser emits. Counts are per row
(a concept named twice in one caption counts once), the way DiHT counts concept frequencies.
A row's soft target is uniform over its in-vocabulary concepts.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np

from pipeline.store import storage
from pipeline.store.partitions import atomic_write_json

OBJECTS, ATTRIBUTES = "objects", "attributes"
HEADS = (OBJECTS, ATTRIBUTES)


@dataclass(frozen=True)
class VocabConfig:
    # A concept must occur in at least this many rows: rarer ones are mostly parse noise and
    # cannot be learnt by a linear classifier anyway.
    min_count: int = 5
    # Cap on vocabulary sizes (most frequent first). Dense float32 labels would cost 4 bytes per
    # concept per image; the sparse top-k labels do not grow with these sizes.
    max_objects: int = 10_000
    max_attributes: int = 5_000


def normalise_concept(text: str | None) -> str | None:
    if text is None:
        return None
    text = " ".join(str(text).lower().split())
    return text or None


def row_concepts(objects: Iterable[str] | None, attributes: Iterable[dict] | None
                 ) -> tuple[list[str], list[str]]:
    """One row's parse -> (unique objects, unique attribute words), in first-seen order.

    `attributes` is the SHARD column: a list of {"object": str, "values": [str, ...]}.
    """
    objs = _unique(normalise_concept(o) for o in (objects or ()))
    attrs = _unique(normalise_concept(v) for a in (attributes or ()) for v in (a.get("values") or ()))
    return objs, attrs


def _unique(items: Iterable[str | None]) -> list[str]:
    seen: dict[str, None] = {}
    for it in items:
        if it is not None:
            seen.setdefault(it, None)
    return list(seen)


def count_concepts(tables) -> dict[str, Counter]:
    """Per-row concept counts over pyarrow tables (or record batches) with objects/attributes."""
    counts = {OBJECTS: Counter(), ATTRIBUTES: Counter()}
    for table in tables:
        for objs, attrs in zip(table.column(OBJECTS).to_pylist(), table.column(ATTRIBUTES).to_pylist()):
            o, a = row_concepts(objs, attrs)
            counts[OBJECTS].update(o)
            counts[ATTRIBUTES].update(a)
    return counts


@dataclass(frozen=True)
class Vocabulary:
    name: str
    concepts: tuple[str, ...]
    counts: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.concepts)})

    def __len__(self) -> int:
        return len(self.concepts)

    def encode(self, concepts: Iterable[str]) -> list[int]:
        """Concept strings -> sorted unique vocabulary indices (out-of-vocabulary ones skipped)."""
        return sorted({self._index[c] for c in concepts if c in self._index})

    def to_dict(self) -> dict:
        return {"size": len(self), "concepts": list(self.concepts), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "Vocabulary":
        return cls(name, tuple(d["concepts"]), tuple(int(c) for c in d["counts"]))


def build_vocabulary(name: str, counts: Counter, min_count: int, max_size: int) -> Vocabulary:
    # Most frequent first, ties by name: the same counts always give the same indices.
    kept = sorted(((c, n) for c, n in counts.items() if n >= min_count), key=lambda cn: (-cn[1], cn[0]))
    kept = kept[:max_size]
    return Vocabulary(name, tuple(c for c, _ in kept), tuple(n for _, n in kept))


def build_vocabularies(counts: dict[str, Counter], config: VocabConfig) -> dict[str, Vocabulary]:
    vocabs = {
        OBJECTS: build_vocabulary(OBJECTS, counts[OBJECTS], config.min_count, config.max_objects),
        ATTRIBUTES: build_vocabulary(ATTRIBUTES, counts[ATTRIBUTES], config.min_count, config.max_attributes),
    }
    for name, vocab in vocabs.items():
        if len(vocab) < 2:
            raise ValueError(f"the {name} vocabulary has {len(vocab)} concept(s) with min_count="
                             f"{config.min_count} ({len(counts[name])} distinct before the cut); "
                             "a classifier needs at least 2 - lower min_count or add data")
    return vocabs


def write_vocab_json(vocabs: dict[str, Vocabulary], path: str, config: VocabConfig) -> None:
    doc = {"config": asdict(config), **{name: v.to_dict() for name, v in vocabs.items()}}
    atomic_write_json(doc, path)


def read_vocab_json(path: str) -> dict[str, Vocabulary]:
    doc = storage.read_json(path)
    return {name: Vocabulary.from_dict(name, doc[name]) for name in HEADS}


def targets_csr(rows_indices: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-row index lists -> CSR (offsets [n+1], indices); keeps soft targets sparse at scale."""
    offsets = np.zeros(len(rows_indices) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows_indices])
    indices = np.fromiter((i for r in rows_indices for i in r), dtype=np.int64, count=int(offsets[-1]))
    return offsets, indices


def dense_soft_targets(offsets: np.ndarray, indices: np.ndarray, rows: np.ndarray, n_classes: int
                       ) -> np.ndarray:
    """Soft targets of the given rows: uniform over each row's concepts (rows need >= 1 concept)."""
    out = np.zeros((len(rows), n_classes), dtype=np.float32)
    for j, r in enumerate(rows):
        idx = indices[offsets[r]:offsets[r + 1]]
        out[j, idx] = 1.0 / len(idx)
    return out
