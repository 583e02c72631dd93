#!/usr/bin/env bash
# Launch moedist with Open MPI's mpirun (ranks come from OMPI_COMM_WORLD_* variables).
#
#   launch/mpirun.sh train configs/tiny.yaml
#   NPROC=16 HOSTFILE=hosts.txt launch/mpirun.sh train configs/big.yaml     # 16 ranks over the hosts
#   MOEDIST_ENTRY=tests/scripts/dist_smoke.py NPROC=2 launch/mpirun.sh      # a script instead of the CLI
#
# Env: NPROC (total ranks; default: GPUs, else 1), HOSTFILE (Open MPI hostfile; MASTER_ADDR then
# defaults to its first host), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON (python on
# PATH, else the repo's .venv), MOEDIST_ENTRY (default "-m moedist.cli"; a path runs that script,
# "-m pkg.mod" a module), MPIRUN_BIND (--bind-to value; default none: a rank's intra-op and
# data-loader threads should not share one core), MPIRUN_ARGS (extra mpirun flags).
# Arguments go to the entry unchanged.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NPROC=$(default_nproc)
HOSTFILE=${HOSTFILE:-}
HOST_ARGS=()
if [[ -n $HOSTFILE ]]; then
    HOST_ARGS=(--hostfile "$HOSTFILE")
    MASTER_ADDR=${MASTER_ADDR:-$(awk '$1 !~ /^#/ && NF { print $1; exit }' "$HOSTFILE")}
fi
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-$(find_tool python)}
entry_args -m
read -r -a EXTRA <<< "${MPIRUN_ARGS:-}"

MPIRUN=$(find_tool mpirun)
exec "$MPIRUN" --allow-run-as-root --oversubscribe --bind-to "${MPIRUN_BIND:-none}" -n "$NPROC" \
    ${HOST_ARGS[@]+"${HOST_ARGS[@]}"} \
    -x MASTER_ADDR -x MASTER_PORT ${EXTRA[@]+"${EXTRA[@]}"} \
    "$PYTHON" "${ENTRY_ARGS[@]}" "$@"
