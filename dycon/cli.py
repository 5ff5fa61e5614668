"""Command-line conventions shared by every ``python -m dycon.<cmd>``.

- One flag style: flags are declared with hyphens (``--labeled-bs``) and accepted with hyphens or
  underscores (``--labeled_bs``, the SSL4MIS spelling); abbreviations are refused, so a typo is
  an error rather than a guess.
- Every flag has a help text (checked when the parser is built).
- A usage error is one line, ``<prog>: error: <message>`` (exit status 2), not argparse's usage
  block; a misspelled flag names the closest one (``--labelnm``: did you mean --labelnum?).
- ``run(main, prog)``: an error the project raises on purpose for bad input (a missing file, a
  bad data file or config: a ``ValueError``/``OSError`` raised in dycon's own code, or a
  ``UsageError``) prints one line, ``<prog>: error: <message>``, and exits with status 2, as
  argparse does for a bad flag. Any other exception is a bug and keeps its traceback; ``--debug``
  shows the traceback of every error.

This module does not import torch, so ``--help`` is fast when a command parses its arguments
before importing the heavy modules.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import traceback
from typing import Callable, Sequence

EXIT_USAGE = 2
# folders of the project's own code: errors raised there on purpose are the user's to fix
_PROJECT_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), pkg) + os.sep
                      for pkg in ("dycon", "dycon_kernels"))
_EXPECTED_TYPES = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                   PermissionError)


class UsageError(Exception):
    """Something the user asked for cannot be done (reported in one line, exit status 2)."""


def _hyphenate(option: str) -> str:
    return "--" + option[2:].replace("_", "-") if option.startswith("--") else option


def _add_checked(add: Callable, prog: str, names: tuple, kwargs: dict):
    """``add(*names, **kwargs)`` with the flag names hyphenated, after checking the help text."""
    if any(n.startswith("-") for n in names) and not kwargs.get("help"):
        raise ValueError(f"{prog}: flag {names[0]} needs a help text")
    return add(*(_hyphenate(n) for n in names), **kwargs)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the conventions above; adds ``--debug``."""

    def __init__(self, prog: str, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("epilog", "Flags may be written with - or _ (--labeled-bs or --labeled_bs).")
        super().__init__(prog=prog, description=description, allow_abbrev=False, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="show the Python traceback of an error instead of its one-line message")

    def add_argument(self, *names, **kwargs):
        return _add_checked(super().add_argument, self.prog, names, kwargs)

    def add_mutually_exclusive_group(self, **kwargs):
        return self._checked_group(super().add_mutually_exclusive_group(**kwargs))

    def add_argument_group(self, *args, **kwargs):
        return self._checked_group(super().add_argument_group(*args, **kwargs))

    def _checked_group(self, group):
        add = group.add_argument
        group.add_argument = lambda *names, **kwargs: _add_checked(add, self.prog, names, kwargs)
        return group

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(normalize_flags(args), namespace)

    def error(self, message: str):
        """One line instead of argparse's usage block, with the closest flag to each unknown one."""
        hints = [f"{word}: did you mean {match}?" for word, match in self._closest_flags(message)]
        text = "; ".join([message, *hints])
        self.exit(EXIT_USAGE, f"{self.prog}: error: {text} (--help lists the flags)\n")

    def _closest_flags(self, message: str) -> list[tuple[str, str]]:
        """(unknown flag, closest known flag) for each flag of an 'unrecognized arguments' message."""
        if not message.startswith("unrecognized arguments: "):
            return []
        known = [flag for flag in self._option_string_actions if flag.startswith("--")]
        pairs = []
        for word in message.split(": ", 1)[1].split():
            flag = word.split("=", 1)[0]
            match = difflib.get_close_matches(flag, known, n=1, cutoff=0.6) if flag.startswith("--") else []
            if match:
                pairs.append((flag, match[0]))
        return pairs


def normalize_flags(argv: Sequence[str]) -> list[str]:
    """``--labeled_bs=2`` -> ``--labeled-bs=2``: underscores in flag names (not in values, nor
    after ``--``) become hyphens."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            arg = _hyphenate(name) + eq + value
        out.append(arg)
    return out


def is_expected(exc: BaseException) -> bool:
    """True for an error the project raises on purpose about its input (see the module doc)."""
    if isinstance(exc, UsageError):
        return True
    if not isinstance(exc, _EXPECTED_TYPES):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_PROJECT_DIRS)


def run(main: Callable[[Sequence[str] | None], object], prog: str, argv: Sequence[str] | None = None) -> object:
    """Run ``main(argv)`` as a command and return what it returns: an expected error is one line
    on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except Exception as exc:
        if "--debug" in argv or not is_expected(exc):
            raise
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(torch CPU threads, a line for the log saying why).

    ``requested`` (``--threads``) wins, then ``OMP_NUM_THREADS``; else the cores this process may
    use minus the machine's load (1-minute average), at least 1: on a busy machine more threads
    than idle cores make every step wait for the slowest one (seen: 5-24 s per demo step with 2
    threads against 1.2 s with 1, on 2 cores shared with another job). The count changes the
    floating-point summation order, hence the trained weights: it is recorded in the config.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--threads must be at least 1, got {requested}")
        return requested, f"torch threads: {requested} (--threads / train.threads)"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        n = int(os.environ["OMP_NUM_THREADS"])
        return n, f"torch threads: {n} (OMP_NUM_THREADS)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    n = max(1, min(cores, int(cores - load + 0.5)))
    why = f"{cores} cores, load {load:.1f}"
    if n < cores:
        return n, (f"torch threads: {n} of {cores} ({why}: the machine is busy; fewer threads than cores "
                   "avoids oversubscription; --threads N sets it)")
    return n, f"torch threads: {n} ({why})"


def check_device(name: str) -> None:
    """A device torch does not know, or ``--device cuda[:N]`` where it sees no such GPU, fails
    here, in one line, before anything is written or loaded (train, evaluate, predict)."""
    if name == "auto":
        return
    import torch

    try:
        index = torch.device(name).index or 0
    except RuntimeError as err:
        raise UsageError(f"--device {name}: not a device name ({err})") from None
    count = torch.cuda.device_count()
    if torch.device(name).type != "cuda" or index < count:
        return
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    seen = "no CUDA GPU is visible" if count == 0 else f"only {count} CUDA GPU(s) are visible"
    raise UsageError(f"--device {name}: {seen} (torch {torch.__version__}, {build}); "
                     "use --device cpu, or auto for the GPU where there is one")
