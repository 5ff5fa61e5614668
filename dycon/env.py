"""The environment report to paste into an issue: dycon-env, or python -m dycon.env.

Versions, the compiled extension's state, the CPU, and per device the backends that can run and
what ``backend="auto"`` picks; it is ``python -m dycon_kernels``'s report (``dycon_kernels/__main__.py``).
Exit status 0 when fused kernels run both ops on every device present, 1 otherwise.

The console script lives here rather than in ``dycon_kernels``, whose package imports torch, so
that ``--help`` and a usage error answer before torch is imported.
"""
from __future__ import annotations

import sys

from dycon import cli

PROG = "dycon-env"


def build_parser() -> cli.ArgumentParser:
    return cli.ArgumentParser(PROG, description=__doc__.split("\n")[0])


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    from dycon_kernels.__main__ import main as report   # torch: after parsing

    return report()


def console_main() -> int:
    """The dycon-env command (setup.py's console scripts): the report's exit status; errors as
    every dycon command gives them (one line, the traceback with --debug)."""
    return cli.run(main, PROG)


if __name__ == "__main__":
    sys.exit(console_main())
