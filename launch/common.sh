# Sourced (not run) by launch/torchrun.sh, mpiexec.sh and sbatch.sh: what every launcher does with
# its arguments, so the three hand their ranks the same run directory, workload and environment.
#
# dh_parse_args RUN_DIR [WORKLOAD...]   needs $root (the checkout); sets run_dir (absolute, created),
#   workload (default: -m dist_hooks.demo), python (PYTHON, else the checkout's .venv, else python3)
#   and run_arg (RUN_ARG RUN_DIR, default --out RUN_DIR); exports DIST_HOOKS_RUN_DIR and puts the
#   checkout on PYTHONPATH, so the package imports even where it is not installed in $python.
dh_parse_args() {
  run_dir="$1"; shift
  workload=("$@")
  [ ${#workload[@]} -gt 0 ] || workload=(-m dist_hooks.demo)
  python="${PYTHON:-}"
  if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python="python3"; fi
  fi
  mkdir -p "$run_dir"
  run_dir="$(cd "$run_dir" && pwd)"
  export DIST_HOOKS_RUN_DIR="$run_dir"
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  run_arg=()
  [ -z "${RUN_ARG-"--out"}" ] || run_arg=("${RUN_ARG-"--out"}" "$run_dir")
}
