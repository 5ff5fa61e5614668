"""Checkpoint files: atomic writes, and reads that never run code from the file.

Training, evaluation and prediction all read checkpoints through ``load_checkpoint``, so a file
that carries a pickled Python object (anything beyond tensors and plain containers) is refused
the same way everywhere, with a message that says so, rather than torch's generic advice to
retry with ``weights_only=False``.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

# torch's weights-only unpickler names the class it refused: "GLOBAL module.Name was not an allowed global"
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomic write: a crash mid-save never leaves a truncated checkpoint behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())   # on disk before the rename makes it the checkpoint
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``. Raises ``FileNotFoundError`` for a missing
    file and ``ValueError`` naming the file for one that holds Python objects, is truncated or is
    not a torch checkpoint at all."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused:
            raise ValueError(f"refusing to load {path}: it holds a Python object ({refused[1]}); checkpoints "
                             "are read with weights_only=True, which loads tensors and plain types only and "
                             "never runs code from the file") from err
        raise ValueError(f"cannot read checkpoint {path}: not a torch checkpoint or corrupt") from err
    except Exception as err:   # RuntimeError (truncated zip), EOFError, struct.error, OSError ...
        raise ValueError(f"cannot read checkpoint {path} ({type(err).__name__}: {err})") from err
