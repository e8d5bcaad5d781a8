"""The ``dist-hooks`` command line."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-hooks", description="Tools for dist_hooks runs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, helptext in (
        ("consolidate", "merge all ranks' shards and CSVs of RUN into one readable output"),
        ("info", "summarise RUN: launcher, world size, boundaries, per-rank counts"),
        ("verify", "check RUN's committed lengths, checksums and pointers against the bytes on disk"),
        ("export", "export structures of RUN to ASE-readable files"),
        ("plot", "plot energy, fmax and temperature of RUN versus step"),
    ):
        sp = sub.add_parser(name, help=helptext, description=helptext)
        sp.add_argument("run", metavar="RUN", help="run directory")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    print(f"dist-hooks {args.command}: not implemented yet", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
