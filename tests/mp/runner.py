"""Launch real multi-process jobs from tests: torchrun, mpiexec, or plain env:// processes.

Shared by every multi-process test file (import as ``from tests.mp.runner import run_torchrun``
or ``from mp.runner import ...`` depending on sys.path).  Each launcher:

* uses the interpreter running the tests (``sys.executable``) and the launchers installed next to
  it, so the venv under test is the venv that runs the ranks;
* sets ``PYTHONPATH`` to the repository root (the package is importable without installing) and
  ``OMP_NUM_THREADS=1`` (N ranks on a 2-core machine must not each start a thread per core);
* removes launcher variables inherited from the outside (a pytest run inside ``srun`` or
  ``torchrun`` must not make the children believe they are rank 3 of 8);
* never hangs: the command runs under coreutils ``timeout`` when available, in its own session,
  and the whole session is killed if the Python-side deadline passes.  A timed-out job returns
  ``returncode`` 124 with whatever output it produced.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

__all__ = [
    "REPO_ROOT",
    "clean_env",
    "mpi_available",
    "mpiexec_path",
    "run_command",
    "run_mpiexec",
    "run_plain_env",
    "run_torchrun",
    "torchrun_available",
]

REPO_ROOT = Path(__file__).resolve().parents[2]

# Variables that identify a process's place in a job; inherited ones would mislead the children.
_LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_", "SLURM_", "HYDRA_", "MPI_LOCAL")
_LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                   "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment minus launcher variables, plus PYTHONPATH and OMP setting."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_NAMES and not k.startswith(_LAUNCHER_PREFIXES)}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def mpiexec_path() -> str | None:
    """The mpiexec next to the interpreter (the venv's MPI), else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    return shutil.which("mpiexec")


def mpi_available() -> bool:
    """True when mpi4py imports and an mpiexec exists."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return mpiexec_path() is not None


def torchrun_available() -> bool:
    """True when torch.distributed can be used (torchrun is ``python -m torch.distributed.run``)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available()


def _mpiexec_flags(mpiexec: str) -> list[str]:
    """Open MPI refuses root and over-subscription by default; MPICH's Hydra needs nothing."""
    try:
        version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                                 timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    if "Open MPI" in version or "OpenRTE" in version:
        flags = ["--oversubscribe"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            flags.append("--allow-run-as-root")
        return flags
    return []


def run_command(cmd: Sequence[str], timeout: float = 60.0, env: Mapping[str, str] | None = None,
                cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own session with a hard deadline; never leaves processes behind.

    Returns the CompletedProcess (text output); ``returncode`` 124 means the deadline passed.
    """
    full = [str(c) for c in cmd]
    timeout_bin = shutil.which("timeout")
    if timeout_bin:
        full = [timeout_bin, "-k", "5", f"{timeout:g}"] + full
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(env) if env is not None else clean_env(),
                            cwd=str(cwd) if cwd is not None else str(REPO_ROOT),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout + 15.0)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        code = 124
        err += f"\n[runner] killed after {timeout + 15.0:g} s"
    return subprocess.CompletedProcess(full, code, out, err)


def run_torchrun(script: str | os.PathLike[str], nproc: int, args: Sequence[str] = (),
                 timeout: float = 60.0, env: Mapping[str, str] | None = None,
                 ) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N script args``.

    ``--standalone`` runs a local rendezvous on a free port, so parallel jobs never collide.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(script), *map(str, args)]
    return run_command(cmd, timeout, clean_env(env))


def run_mpiexec(script: str | os.PathLike[str], n: int, args: Sequence[str] = (),
                timeout: float = 60.0, env: Mapping[str, str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
    """``mpiexec -n N python -m mpi4py script args``.

    ``-m mpi4py`` makes an uncaught exception on one rank abort the whole job instead of leaving
    the others blocked.
    """
    mpiexec = mpiexec_path()
    if mpiexec is None:
        raise FileNotFoundError("no mpiexec next to sys.executable or on PATH")
    cmd = [mpiexec, *_mpiexec_flags(mpiexec), "-n", str(n), sys.executable, "-m", "mpi4py",
           str(script), *map(str, args)]
    return run_command(cmd, timeout, clean_env(env))


def run_plain_env(script: str | os.PathLike[str], nproc: int, args: Sequence[str] = (),
                  timeout: float = 60.0, env: Mapping[str, str] | None = None,
                  ) -> subprocess.CompletedProcess[str]:
    """Start ``nproc`` plain processes with torchrun-style variables but no torchrun agent.

    This is what hand-written launchers (and srun with MASTER_ADDR/PORT exported) look like: the
    c10d store server then lives in rank 0's own process.  All ranks run under one ``sh`` so the
    deadline and the output capture cover them together; stdout/stderr are concatenated.
    """
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = clean_env(env)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0")
    quoted = " ".join(_sh_quote(a) for a in [sys.executable, str(script), *map(str, args)])
    lines = [f"RANK={r} LOCAL_RANK={r} {quoted} & pids=\"$pids $!\"" for r in range(nproc)]
    # Exit status: the first non-zero rank status, else 0.
    script_text = "pids=''\n" + "\n".join(lines) + "\nrc=0\nfor p in $pids; do wait $p || " \
        "{ s=$?; [ $rc -eq 0 ] && rc=$s; }; done\nexit $rc\n"
    return run_command(["sh", "-c", script_text], timeout, base)


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
