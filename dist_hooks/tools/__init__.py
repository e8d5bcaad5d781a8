"""The work behind the ``dist-hooks`` command: consolidate, info, verify, export, plot.

Each command's module is importable on its own and exposes the one function the CLI calls; the
pieces they share are modules of their own here (the record stream of a group, the output
groups, the CSV merge, staging, the progress bar). Exit codes and errors live in
:mod:`dist_hooks.errors`.
"""
