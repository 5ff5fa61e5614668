"""Keep torch.compile's on-disk caches from replaying graphs traced from an older dycon_kernels.

torch's AOTAutograd cache keys a compiled graph by the traced Dynamo graph, which names our custom
ops (``dycon::fecl`` ...) but not their Python: the fake implementations that give the outputs'
shapes and the autograd formulas that decide what is saved for the backward and how the backward op
is called. After an upgrade that changes those, a warm cache (``/tmp/torchinductor_<user>`` by
default) hands back the old backward graph: seen here as ``dycon::fecl_backward() Expected a value
of type 'Tensor' for argument 'topk_sim'`` when the op gained two outputs; with an unchanged schema
it could silently run the old formula. torch offers ``torch.compiler.config.cache_key_tag`` ("a
common use case for such a tag is to break caches"), which enters every compile cache's key: we add
a digest of this package's Python sources to it, so a changed dycon_kernels misses the cache
instead of reusing it. A tag the user set is kept in front of ours.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

_PACKAGE = Path(__file__).resolve().parent
_MARK = "dycon_kernels-src-"


def source_digest(root: Path = _PACKAGE) -> str:
    """A short digest of every ``.py`` file under ``root``, by relative path and content."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def tag_compile_caches() -> None:
    """Add this source's digest to torch.compile's cache key tag (once; a user's tag is kept).
    A torch that has no such tag is left as it is."""
    config = getattr(torch.compiler, "config", None)
    if not hasattr(config, "cache_key_tag") or _MARK in config.cache_key_tag:
        return
    config.cache_key_tag = f"{config.cache_key_tag}{'+' if config.cache_key_tag else ''}{_MARK}{source_digest()}"
