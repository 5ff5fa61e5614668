"""File names of the compiled extension and its build record, shared by setup.py and the loader.

Several environments may share one checkout (an editable install builds in place): each torch
build gets its own file, ``_C.<torch tag>.<Python's extension suffix>``, so that building in one
environment never replaces the file another one loads. Next to it, ``<same stem>.build.json``
records what it was built with. This module imports nothing from the package (setup.py loads it
by path, before the package can be imported).
"""
from __future__ import annotations

import json
import re
import subprocess
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

STEM = "_C"
RECORD_SUFFIX = ".build.json"


def torch_tag(torch_version: str) -> str:
    """'2.14.1+cu130' -> 'torch2_14_1_cu130': the part of the file name naming the torch build."""
    return "torch" + re.sub(r"[^0-9A-Za-z]+", "_", torch_version).strip("_")


def extension_filename(torch_version: str) -> str:
    """The extension's file name for this Python and this torch build."""
    return f"{STEM}.{torch_tag(torch_version)}{EXTENSION_SUFFIXES[0]}"


def record_path(extension_path) -> Path:
    """The build record next to an extension file: the same name with ``.build.json`` for ``.so``."""
    return Path(extension_path).with_suffix(RECORD_SUFFIX)


def read_record(extension_path) -> dict:
    """The build record of an extension file ({} when there is none or it cannot be read)."""
    try:
        return json.loads(record_path(extension_path).read_text())
    except (OSError, ValueError):
        return {}


def built_files(directory) -> list[Path]:
    """Every extension file in ``directory``, for any torch and any Python."""
    return sorted(p for p in Path(directory).glob(STEM + ".*")
                  if not p.name.endswith(RECORD_SUFFIX) and p.suffix in (".so", ".pyd"))


def source_commit() -> str:
    """The git commit of the source tree this package is imported from ('abc1234', with
    ' (with uncommitted changes)' when tracked files differ from it), or 'unknown' outside a git
    checkout (an installed wheel): what a run or a benchmark records to say which code made it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
