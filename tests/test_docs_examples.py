"""Every code example in the documentation runs.

Fenced blocks are taken from ``docs/*.md`` and ``README.md``:

* ```` ```python ```` blocks run, each in a fresh interpreter (the one running the tests);
* ```` ```bash ```` / ```` ```sh ```` blocks run only when they carry ``# doc-test: run``
  (most shell blocks show commands for a cluster, a long job or a set-up step);
* a block that must not run says why, on a comment line of its own::

      # doc-test: skip (needs nvalchemi)

  and a block that needs an optional package names it, and is skipped where it is missing::

      # doc-test: requires pandas

The blocks of one document run in document order, in one temporary directory (the working
directory of each block), so that a later block can read what an earlier one wrote, as a reader
following the page would. ``python`` on PATH is the test interpreter, and so are
``.venv/bin/python`` and ``.venv/bin/dist-hooks`` (``-m dist_hooks.cli``) in the working
directory, the paths the docs give a reader in a clone; the repository is on PYTHONPATH, and each
block has a time limit. A failure names the document and the line of the
block.

Blocks about object storage run against the test S3 server (the ``s3_server`` fixture): every
block gets its ``AWS_*`` variables, and a bucket ``my-bucket`` (the name the docs use) exists.

README.md is owned elsewhere and cannot carry markers; its one block that needs an nvalchemi
``dynamics`` object runs with the demo's FIRE engine standing in for it (``EXTERNAL_PRELUDES``).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mp.runner import REPO_ROOT, clean_env, run_command

BLOCK_TIMEOUT = 90.0
DOCS = sorted((REPO_ROOT / "docs").glob("*.md")) + [REPO_ROOT / "README.md"]
PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"bash", "sh", "shell"}

# "# doc-test: <directive>" on a line of its own (after optional indentation)
MARKER = re.compile(r"^\s*#\s*doc-test:\s*(?P<body>.*?)\s*$")
SKIP = re.compile(r"^skip\s*\((?P<reason>[^()]*(?:\([^()]*\)[^()]*)*)\)$")
REQUIRES = re.compile(r"^requires\s+(?P<mods>[A-Za-z_][\w.]*(?:\s*,\s*[A-Za-z_][\w.]*)*)$")

# Blocks in files we may not edit: (file name, a line of the block) -> code run before the block.
EXTERNAL_PRELUDES = {
    ("README.md", "dynamics.register_hook(h)"): (
        "# stand-in for an nvalchemi dynamics object: the demo's FIRE engine (same hook protocol)\n"
        "from dist_hooks.demo import FIRE, LennardJones, make_batch\n"
        "dynamics = FIRE(LennardJones(), make_batch(4, max_atoms=16))\n"
        "n_steps = 30\n"
    ),
}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    markers: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        path = self.path.relative_to(REPO_ROOT) if self.path.is_relative_to(REPO_ROOT) else self.path
        return f"{path}:{self.line}"

    def directive(self) -> tuple[str, str]:
        """("run" | "skip" | "requires" | "default", detail); raises ValueError on a bad marker."""
        kinds = []
        for body in self.markers:
            if body == "run":
                kinds.append(("run", ""))
            elif re.match(r"^skip\b", body):
                m = SKIP.match(body)
                reason = m.group("reason").strip() if m else ""
                if not reason:
                    raise ValueError(f"{self.where}: '# doc-test: {body}' needs a reason in "
                                     "parentheses: '# doc-test: skip (why)'")
                kinds.append(("skip", reason))
            elif m := REQUIRES.match(body):
                kinds.append(("requires", m.group("mods")))
            else:
                raise ValueError(f"{self.where}: unknown marker '# doc-test: {body}'; expected "
                                 "'run', 'skip (reason)' or 'requires module[, module]'")
        if len(kinds) > 1:
            raise ValueError(f"{self.where}: more than one doc-test marker: {self.markers}")
        return kinds[0] if kinds else ("default", "")


def extract_blocks(path: Path) -> list[Block]:
    """Fenced code blocks of a Markdown file (``` or ~~~ fences, possibly indented in lists)."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group("indent")), m.group("fence"), m.group("info").lower()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1
        code = "\n".join(body) + "\n"
        markers = [mm.group("body") for ln in body if (mm := MARKER.match(ln))]
        blocks.append(Block(path, start, lang, code, markers))
    return blocks


def _all_blocks() -> list[Block]:
    return [b for p in DOCS if p.exists() for b in extract_blocks(p)]


def test_markers_are_well_formed():
    """Every marker is known, every skip carries a reason, and markers sit on code blocks that the
    runner understands (a 'run' marker on a block it cannot run would silently do nothing)."""
    problems, counts = [], {"python": 0, "shell": 0, "skip": 0}
    for b in _all_blocks():
        try:
            kind, detail = b.directive()
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if kind == "run" and b.lang not in SHELL_LANGS:
            problems.append(f"{b.where}: '# doc-test: run' on a ```{b.lang} block; python blocks run "
                            "anyway, other languages cannot")
        if kind == "skip" and b.lang not in PYTHON_LANGS | SHELL_LANGS:
            problems.append(f"{b.where}: doc-test marker on a ```{b.lang} block, which never runs")
        if kind == "requires" and b.lang not in PYTHON_LANGS:
            problems.append(f"{b.where}: '# doc-test: requires' is for python blocks")
        if kind == "skip":
            counts["skip"] += 1
        elif b.lang in PYTHON_LANGS:
            counts["python"] += 1
        elif kind == "run":
            counts["shell"] += 1
    assert not problems, "\n".join(problems)
    assert counts["python"] > 0, "no runnable python example found in the docs"


def _runnable(b: Block) -> tuple[bool, str]:
    kind, detail = b.directive()
    if kind == "skip":
        return False, f"skip ({detail})"
    if b.lang in SHELL_LANGS:
        if kind != "run":
            return False, "shell block without '# doc-test: run'"
    elif b.lang not in PYTHON_LANGS:
        return False, f"```{b.lang or 'text'} block"
    if kind == "requires":
        import importlib.util
        missing = [m.strip() for m in detail.split(",") if importlib.util.find_spec(m.strip()) is None]
        if missing:
            return False, f"requires {', '.join(missing)} (not installed)"
    return True, ""


#: the bucket the docs' s3:// examples name; created on the test server
DOCS_BUCKET = "my-bucket"


def _env(scratch: Path, s3: dict[str, str]) -> dict[str, str]:
    env = clean_env(s3)
    bindir = scratch / "bin"  # `python` (and `python3`) on PATH is the test interpreter
    if not bindir.exists():
        bindir.mkdir()
        for name in ("python", "python3"):  # a wrapper, not a symlink: a venv is found by path
            (bindir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
            (bindir / name).chmod(0o755)
    env["PATH"] = f"{bindir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MPLBACKEND"] = "Agg"
    return env


def _venv(cwd: Path) -> None:
    """``.venv/bin/python`` and ``.venv/bin/dist-hooks`` in ``cwd``, as ``launch/setup.sh`` makes
    them in a clone: wrappers of the test interpreter (a venv is found by path, not a symlink)."""
    bindir = cwd / ".venv" / "bin"
    bindir.mkdir(parents=True)
    for name, args in (("python", ""), ("dist-hooks", " -m dist_hooks.cli")):
        (bindir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}"{args} "$@"\n')
        (bindir / name).chmod(0o755)


def _run_block(b: Block, cwd: Path, scratch: Path,
               s3: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = b.code
    for (name, needle), prelude in EXTERNAL_PRELUDES.items():
        if b.path.name == name and needle in code:
            code = prelude + code
    script = scratch / f"{b.path.stem}-{b.line}{'.py' if b.lang in PYTHON_LANGS else '.sh'}"
    script.write_text(code)
    if b.lang in PYTHON_LANGS:
        cmd = [sys.executable, str(script)]
    else:
        cmd = ["bash", "-euo", "pipefail", str(script)]
    return run_command(cmd, timeout=BLOCK_TIMEOUT, env=_env(scratch, s3), cwd=cwd)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_examples_run(doc: Path, tmp_path: Path, s3_server):
    if not doc.exists():
        pytest.skip(f"{doc.name} does not exist")
    s3_server.new_bucket(DOCS_BUCKET)
    blocks = extract_blocks(doc)
    cwd, scratch = tmp_path / "work", tmp_path / "blocks"
    cwd.mkdir()
    scratch.mkdir()
    _venv(cwd)
    ran, skipped, took = 0, [], []
    for b in blocks:
        ok, why = _runnable(b)
        if not ok:
            skipped.append(f"{b.where}: {why}")
            continue
        t0 = time.monotonic()
        res = _run_block(b, cwd, scratch, s3_server.env)
        took.append(f"{b.line}: {time.monotonic() - t0:.1f}s")
        assert res.returncode == 0, (
            f"example at {b.where} failed with status {res.returncode}\n--- code\n{b.code}"
            f"--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-5000:]}")
        ran += 1
    print(f"{doc.name}: ran {ran} block(s) (line: seconds {', '.join(took)}); not run: {skipped}")


def test_marker_parser(tmp_path: Path):
    """The parser itself: fences, markers, and the errors a typo or a missing reason gives."""
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n```python\n# doc-test: skip (needs nvalchemi (0.2))\nimport nvalchemi\n```\n\n"
                   "- item\n\n  ```bash\n  # doc-test: run\n  echo hi\n  ```\n\n"
                   "```python\n# doc-test: requires pandas, ase\n```\n\n"
                   "```python\n# doc-test: skip\n```\n\n```python\n# doc-test: skp (typo)\n```\n\n"
                   "```text\nnot code\n```\n")
    b = extract_blocks(doc)
    assert [(x.lang, x.line) for x in b] == [("python", 3), ("bash", 10), ("python", 15),
                                             ("python", 19), ("python", 23), ("text", 27)]
    assert b[0].directive() == ("skip", "needs nvalchemi (0.2)")
    assert b[1].directive() == ("run", "") and b[1].code == "# doc-test: run\necho hi\n"
    assert b[2].directive() == ("requires", "pandas, ase")
    with pytest.raises(ValueError, match="needs a reason"):
        b[3].directive()
    with pytest.raises(ValueError, match="unknown marker"):
        b[4].directive()
    assert b[5].directive() == ("default", "") and not _runnable(b[5])[0]
