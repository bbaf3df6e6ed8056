"""Stable row keys: the join key of ledger, shards and labels (DESIGN.md, "Keys are stable").

img2dataset's own `key` is used when the input has one; otherwise the key is a deterministic hash of
url + caption, so the same pair gets the same key in every run and on every machine.
"""
from __future__ import annotations

import hashlib

KEY_HEX_CHARS = 20  # 80 bits: collision odds ~1e-5 at 5e9 rows (birthday bound)


def content_key(url: str | None, caption: object) -> str:
    """Hash of url and caption (any value: non-strings are hashed by their repr, bytes as bytes)."""
    h = hashlib.blake2b(digest_size=KEY_HEX_CHARS // 2)
    h.update((url or "").encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    if isinstance(caption, (bytes, bytearray)):
        h.update(b"b" + bytes(caption))
    elif isinstance(caption, str):
        h.update(b"s" + caption.encode("utf-8", "surrogatepass"))
    else:
        h.update(b"r" + repr(caption).encode())
    return h.hexdigest()


def duplicate_key(key: str, occurrence: int) -> str:
    """Key of the n-th (>= 2) row carrying an already used key: unique, and traceable to the first."""
    return f"{key}~{occurrence}"
