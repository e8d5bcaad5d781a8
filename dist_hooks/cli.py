"""The ``dist-hooks`` command line: consolidate, info, verify, export and plot a recorded run.

Thin by design: parsing and exit codes live here, the work in :mod:`dist_hooks.tools` (each
command is a function there, usable from Python). ``main(argv)`` returns the exit status
instead of exiting, so tests and wrappers can call it in-process. Each command imports its tool
only when it runs, so ``--help`` and usage errors load neither zarr nor pyarrow. Reference:
``docs/cli.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from . import __version__
from .errors import (
    EXIT_DAMAGE,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_MISSING_DEPENDENCY,
    EXIT_OK,
    EXIT_USAGE,
    DistHooksError,
    exit_code_of,
)

#: The exit statuses and what each means: one table, for every ``--help`` (docs/cli.md lists
#: the same; the codes themselves are :mod:`dist_hooks.errors`'s).
EXIT_MEANINGS: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success (verify: no damage found; consolidate: written or already up to date)"),
    (EXIT_DAMAGE, "damage found (verify), or refused because committed data are damaged"),
    (EXIT_USAGE, "usage error: bad options, RUN is not a dist_hooks run directory, or a path "
                 "cannot be read or written (the message names it)"),
    (EXIT_LOCKED, "another `dist-hooks consolidate` of the same run holds its lock"),
    (EXIT_MISSING_DEPENDENCY, "an optional dependency is missing (export: ase, plot: matplotlib)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C); outputs are left as they were before the command"),
)
EXIT_CODES = "exit status:\n" + "".join(f"  {code:<4} {meaning}\n"
                                         for code, meaning in EXIT_MEANINGS)


def _add_command(sub: Any, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand, its description kept as written and the exit table under its help."""
    return sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog=EXIT_CODES, help=help, description=description)


def _add_rank_root(p: argparse.ArgumentParser,
                   holds: str = "its --local-dir, copied or mounted") -> None:
    """``--rank-root``, the same on every command; ``holds``: what the command reads there."""
    p.add_argument("--rank-root", action="append", default=[], metavar="DIR", dest="rank_roots",
                   help=f"for a run recorded with storage='local': a directory holding a "
                        f"node's local files ({holds}); repeat for each node")


def _add_run(p: argparse.ArgumentParser, what: str = "run directory") -> None:
    """``RUN`` and ``--cache``, the same on every command: a local run or an ``s3://`` one."""
    p.add_argument("run", metavar="RUN", help=f"{what}, or s3://bucket/prefix (read through a "
                                              "local mirror; credentials from AWS_*)")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="where s3:// runs are mirrored (default: $XDG_CACHE_HOME/dist_hooks, "
                        "i.e. ~/.cache/dist_hooks); a second look fetches only what changed")


def _add_progress(p: argparse.ArgumentParser) -> None:
    """``--progress``, shared by the commands that read every committed byte."""
    p.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress bar on stderr (auto: only when stderr is a terminal)")


def _add_json(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--json", action="store_true", help=help)


def _progress(value: str) -> bool | None:
    return {"auto": None, "always": True, "never": False}[value]


def _dpi(value: str) -> int:
    """A resolution matplotlib accepts and memory holds (argparse reports anything else)."""
    n = int(value)
    if not 10 <= n <= 1200:
        raise argparse.ArgumentTypeError(f"{value}: a resolution from 10 to 1200 dots per inch")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dist-hooks`` (every subcommand, with its options)."""
    p = argparse.ArgumentParser(
        prog="dist-hooks", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tools for dist_hooks runs: consolidate, inspect, verify, export, plot. "
                    "Only what the last checkpoint boundary committed is read.",
        epilog=EXIT_CODES)
    p.add_argument("--version", action="version", version=f"dist-hooks {__version__}",
                   help="print the dist_hooks version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = _add_command(
        sub, "consolidate",
        help="merge all ranks' groups and CSVs of RUN into one readable output",
        description="Merge every rank's committed records into one Zarr group per snapshot "
                    "hook and one converged group (ordered by step, rank, sample id), and "
                    "every rank's CSV log into one CSV (+ Parquet). Streams with bounded "
                    "memory; written to a temporary directory and renamed into place with a "
                    "completion marker; a second run on an unchanged run changes nothing.")
    _add_run(c, "run directory (holds run.json)")
    c.add_argument("--out", metavar="PATH", default=None,
                   help="output directory, or s3://bucket/prefix (uploaded, its marker last) "
                        "(default: RUN/consolidated, in the store for an s3:// run)")
    c.add_argument("--skip-damaged", action="store_true",
                   help="leave out damaged (rank, hook) parts instead of refusing; they are "
                        "listed in the output's consolidated.json under 'skipped'")
    c.add_argument("--force", action="store_true",
                   help="rebuild even when the output is up to date")
    c.add_argument("--no-parquet", action="store_true", help="write the merged CSVs only")
    c.add_argument("--no-checksums", action="store_true",
                   help="copy trajectory shard files after checking only their index, without "
                        "decoding every atom row against its committed crc32 (faster; for a run "
                        "`dist-hooks verify` has checked)")
    _add_progress(c)
    c.add_argument("--block-records", type=int, default=4096, metavar="N",
                   help="records read per rank per block (memory/speed trade-off; default 4096)")
    c.add_argument("--block-atoms", type=int, default=65536, metavar="N",
                   help="atom rows read per rank per block (default 65536)")
    _add_json(c, "print the summary as JSON")
    _add_rank_root(c)

    i = _add_command(sub, "info",
                     help="summarise RUN: launcher, world size, boundaries, per-rank counts",
                     description="Summarise a run from its manifest: launcher, world size, "
                                 "boundaries, per-rank record and row counts per hook, "
                                 "converged count, step range and disk use.")
    _add_run(i, "run directory (or a consolidated output)")
    _add_json(i, "machine-readable output (stable keys)")
    i.add_argument("--no-disk", action="store_true", help="skip the disk-use walk")
    _add_rank_root(i, "for the step range")

    v = _add_command(sub, "verify",
                     help="check RUN's committed lengths, checksums and pointers against the "
                          "bytes on disk",
                     description="Read every committed byte of RUN and check it against the "
                                 "manifest: lengths, crc32 checksums, CSR pointers, shapes, "
                                 "dtypes, CSV rows, paths. Prints one line per problem, "
                                 "naming the file and place.")
    _add_run(v)
    _add_json(v, "print the report as JSON")
    _add_progress(v)
    _add_rank_root(v)

    e = _add_command(sub, "export",
                     help="export structures of RUN to ASE-readable files",
                     description="Export converged structures or a snapshot trajectory to "
                                 "extended XYZ, an ASE database or an ASE trajectory, with "
                                 "velocities, energy, forces, step, rank and sample id. Needs "
                                 "the 'ase' extra.")
    _add_run(e, "run directory (or a consolidated output)")
    e.add_argument("--what", choices=("converged", "trajectory"), required=True)
    e.add_argument("--format", dest="fmt", choices=("extxyz", "ase-db", "traj"), required=True)
    e.add_argument("--out", metavar="PATH", required=True, help="output file")
    e.add_argument("--hook", default=None,
                   help="snapshot hook for --what trajectory (default: the only one)")
    e.add_argument("--sample-id", dest="sample_ids", type=int, action="append", default=None,
                   metavar="N", help="only the records of sample id N (repeatable)")
    e.add_argument("--rank", dest="ranks", type=int, action="append", default=None,
                   metavar="R", help="only the records of rank R (repeatable)")
    e.add_argument("--steps", default=None, metavar="A:B",
                   help="only steps A <= step < B (either end may be left out)")
    _add_progress(e)
    _add_rank_root(e)

    pl = _add_command(sub, "plot",
                      help="plot energy per atom, fmax and temperature of RUN versus step",
                      description="Plot energy per atom (or total, --total-energy), fmax and "
                                  "temperature versus step (and MD time in fs where the run's "
                                  "settings give the time step): the mean per rank, and the "
                                  "spread over all systems. The relax-to-MD switch and the "
                                  "fmax threshold are marked when the run's settings name "
                                  "them. Needs the 'plot' extra (matplotlib).")
    _add_run(pl, "run directory (or a consolidated output)")
    pl.add_argument("--out", metavar="FILE", required=True,
                    help="output file; its suffix chooses the format: .png, .svg or .pdf")
    pl.add_argument("--hook", default="log", help="CSV log to plot (default: log)")
    pl.add_argument("--total-energy", action="store_true",
                    help="plot each system's total energy instead of its energy per atom")
    pl.add_argument("--dpi", type=_dpi, default=110, help="resolution of a PNG (default: 110)")
    _add_rank_root(pl)
    return p


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, sort_keys=False, default=str))


def _consolidate(args: argparse.Namespace) -> int:
    from .tools.consolidate import consolidate

    s = consolidate(args.run, args.out, skip_damaged=args.skip_damaged, force=args.force,
                    progress=_progress(args.progress), parquet=not args.no_parquet,
                    block_records=args.block_records, block_atoms=args.block_atoms,
                    checksums=not args.no_checksums, rank_roots=args.rank_roots,
                    cache=args.cache)
    if args.json:
        _print_json({k: v for k, v in s.items() if k != "manifest"})
        return 0
    if s["status"] == "up-to-date":
        print(f"{s['out']}: up to date (boundary {s['source'].get('boundary')}); nothing to do")
        return 0
    parts = []
    for name, h in s["hooks"].items():
        n = h.get("records", h.get("rows"))
        parts.append(f"{name}: {n} {'rows' if h['kind'] == 'csv' else 'records'}")
    if s.get("converged"):
        parts.append(f"converged: {s['converged']['records']} records")
    print(f"{s['out']}: consolidated {', '.join(parts) or 'nothing (no committed data)'}")
    for msg in s.get("skipped", []):
        print(f"skipped (damaged): {msg}", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from .tools.info import format_info, run_info

    info = run_info(args.run, disk=not args.no_disk, rank_roots=args.rank_roots,
                    cache=args.cache)
    if args.json:
        _print_json(info)
    else:
        print(format_info(info))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .tools.verify import format_report, verify_run

    report = verify_run(args.run, progress=_progress(args.progress),
                        rank_roots=args.rank_roots, cache=args.cache)
    if args.json:
        _print_json(report)
    else:
        print(format_report(args.run, report))
    return 0 if report["ok"] else 1


def _export(args: argparse.Namespace) -> int:
    from .tools.export import export

    r = export(args.run, what=args.what, fmt=args.fmt, out=args.out, hook=args.hook,
               rank_roots=args.rank_roots, sample_ids=args.sample_ids, ranks=args.ranks,
               steps=args.steps, progress=_progress(args.progress), cache=args.cache)
    print(f"{r['out']}: {r['structures']} structures ({r['what']}, {r['format']})")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .tools.plot import plot

    r = plot(args.run, args.out, hook=args.hook, dpi=args.dpi, rank_roots=args.rank_roots,
             per_atom=not args.total_energy, cache=args.cache)
    print(f"{r['out']}: {', '.join(r['metrics'])} of {r['systems']} systems on {r['ranks']} "
          f"rank{'s' if r['ranks'] != 1 else ''}, {r['rows']} rows ({r['format']})")
    return 0


COMMANDS = {"consolidate": _consolidate, "info": _info, "verify": _verify, "export": _export,
            "plot": _plot}


def main(argv: list[str] | None = None) -> int:
    """Run ``dist-hooks`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): report, do not exit
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except DistHooksError as exc:  # refused or detected on purpose: its own exit status
        print(f"dist-hooks {args.command}: {_scrub(str(exc))}", file=sys.stderr)
        return exit_code_of(exc)
    except KeyboardInterrupt:
        print(f"dist-hooks {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `dist-hooks info RUN | head`
        return 0
    except OSError as exc:  # a path that cannot be read or written (read-only, missing, full)
        print(f"dist-hooks {args.command}: {_os_error(exc)}", file=sys.stderr)
        return EXIT_USAGE


#: the environment variables whose values a message must never show
_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def _scrub(text: str) -> str:
    """``text`` without any credential of the environment (a store's error message may quote
    the access key it refused); credentials are read from there only, never printed."""
    for name in _SECRETS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, f"<{name}>")
    return text


def _os_error(exc: OSError) -> str:
    """One line naming the path and the reason (``cannot use PATH: Permission denied``)."""
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    return f"cannot use {where}: {exc.strerror or exc}" if where else str(exc)


if __name__ == "__main__":
    sys.exit(main())
