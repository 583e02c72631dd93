# Shared by the launch/*.sh wrappers (sourced, not run).
# Sets ROOT; defines find_tool, gpu_count, default_nproc, entry_args.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# A tool from PATH, else from the project's .venv/bin; exits 127 when neither has it.
find_tool() { command -v "$1" 2>/dev/null || { [[ -x $ROOT/.venv/bin/$1 ]] && echo "$ROOT/.venv/bin/$1"; } || { echo "$1 not found on PATH or in $ROOT/.venv/bin" >&2; exit 127; }; }

gpu_count() { nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; }

# NPROC from the env, else the number of GPUs, else 1.
default_nproc() { local n=${NPROC:-$(gpu_count)}; n=${n:-1}; [[ $n == 0 ]] && n=1; echo "$n"; }

# ENTRY_ARGS from MOEDIST_ENTRY (default "-m moedist.cli"): a path runs that script,
# "-m pkg.mod" a module (spelled with the launcher's module flag, $1, default -m).
entry_args() {
    local entry=${MOEDIST_ENTRY:--m moedist.cli}
    if [[ $entry == "-m "* ]]; then ENTRY_ARGS=("${1:--m}" "${entry#-m }"); else ENTRY_ARGS=("$entry"); fi
}
