"""Compare training runs without TensorBoard: validation Dice and total loss of each run on one figure.

    python -m dycon.plot RUN_DIR [RUN_DIR ...] [-o compare.png]

Each run is read from its ``metrics.csv`` and labelled by its directory name. One run's full set
of curves (every loss term, beta, learning rate, validation Dice) is its ``curves.png``, written at
the end of training; ``python -m dycon.plot --curves RUN_DIR`` (re)draws it.
"""
from __future__ import annotations

from pathlib import Path

from dycon import cli


PROG = "python -m dycon.plot"


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(PROG, description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each holding metrics.csv)")
    p.add_argument("-o", "--output", default="compare.png", help="figure to write (default: compare.png)")
    p.add_argument("--curves", action="store_true", help="instead, write each run's own RUN_DIR/curves.png")
    return p


def main(argv=None) -> list[Path]:
    args = build_parser().parse_args(argv)
    from dycon.viz import runs_figure, save_figure, write_curves   # matplotlib: after parsing

    if args.curves:
        written = [write_curves(run) for run in args.runs]
    else:
        written = [save_figure(runs_figure(args.runs), args.output)]
    for path in written:
        print(f"wrote {path}")
    return written


def console_main() -> None:
    """The dycon-plot command (setup.py's console scripts)."""
    cli.run(main, PROG)


if __name__ == "__main__":
    console_main()
