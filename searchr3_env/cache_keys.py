"""Keys of the corpus-index cache: a key names everything that produced the cached rows.

A key built from a model folder's *name* once handed one model's document
embeddings to another model kept in a folder of the same name, and the
metrics were silently wrong. An encoder that wants its corpus index cached
exposes ``cache_key``: a digest of the files its weights and tokenizer come
from (:func:`folder_digest`) together with every setting that changes a
document's embedding (dtype, prompt template, case folding, truncation),
combined by :func:`cache_key`. An encoder without one is never cached.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime in ns) -> sha256


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, memoised per path, size and modification time (a model is read once a process)."""
    path = Path(path).resolve()
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_DIGESTS[memo] = h.hexdigest()
    return _FILE_DIGESTS[memo]


def folder_digest(folder: str | Path) -> str:
    """sha256 over the relative paths and contents of every file in a model folder (hidden files aside:
    locks, caches and temporaries say nothing about the model)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    return cache_key(*(part for p in files for part in (p.relative_to(folder).as_posix(), file_digest(p))))


def cache_key(*parts: object) -> str:
    """sha256 over the parts' ``str`` forms, length-prefixed so no two different part lists collide."""
    h = hashlib.sha256()
    for part in parts:
        data = str(part).encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def sanitise(name: str) -> str:
    """A name safe inside a file name."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "_"
