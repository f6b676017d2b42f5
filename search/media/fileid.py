"""What identifies an indexed file's bytes: one content hash for the indexer and the server."""

from __future__ import annotations

import hashlib


def content_hash(data: bytes) -> str:
    """The hash stored with each image item (BLAKE2b, 160 bits): equal bytes, equal hash."""
    return hashlib.blake2b(data, digest_size=20).hexdigest()
