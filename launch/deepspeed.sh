#!/usr/bin/env bash
# Launch moedist with the DeepSpeed launcher (it appends --local_rank=N to the arguments).
#
#   launch/deepspeed.sh train configs/tiny.yaml
#   HOSTFILE=hostfile NNODES=2 MASTER_ADDR=node0 launch/deepspeed.sh train configs/big.yaml
#   HOSTFILE=hostfile NODE_RANK=0 launch/deepspeed.sh train configs/big.yaml   # no ssh: on node0,
#   HOSTFILE=hostfile NODE_RANK=1 launch/deepspeed.sh train configs/big.yaml   # ... and on node1
#   MOEDIST_ENTRY=tests/scripts/dist_smoke.py NPROC=2 launch/deepspeed.sh  # a script instead of the CLI
#
# Env: NPROC (processes per node; default: GPUs, else 1), HOSTFILE (DeepSpeed hostfile,
# "host slots=N" lines; MASTER_ADDR then defaults to its first host), NNODES (nodes of the
# hostfile to use; default all), NODE_RANK (with HOSTFILE: DeepSpeed's no-ssh mode, `--no_ssh
# --node_rank N`: run this script on every host of the hostfile, N = the host's line),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# DS_ACCELERATOR (cpu when no GPU is visible), MOEDIST_ENTRY (default "-m moedist.cli";
# a path runs that script, "-m pkg.mod" a module), DEEPSPEED_ARGS (extra launcher flags).
# Arguments go to the entry unchanged.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

GPUS=$(gpu_count)
if [[ ${GPUS:-0} == 0 ]]; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
NPROC=$(default_nproc)
HOSTFILE=${HOSTFILE:-}
MASTER_PORT=${MASTER_PORT:-29500}
ARGS=(--num_gpus "$NPROC" --master_port "$MASTER_PORT")
if [[ -n $HOSTFILE ]]; then
    MASTER_ADDR=${MASTER_ADDR:-$(awk '$1 !~ /^#/ && NF { print $1; exit }' "$HOSTFILE")}
    ARGS+=(--hostfile "$HOSTFILE" --no_ssh_check --master_addr "$MASTER_ADDR")
    [[ -n ${NNODES:-} ]] && ARGS+=(--num_nodes "$NNODES")
    [[ -n ${NODE_RANK:-} ]] && ARGS+=(--no_ssh --node_rank "$NODE_RANK")
else
    ARGS+=(--master_addr "${MASTER_ADDR:-127.0.0.1}")
fi
entry_args --module
read -r -a EXTRA <<< "${DEEPSPEED_ARGS:-}"

DEEPSPEED=$(find_tool deepspeed)
exec "$DEEPSPEED" "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"} "${ENTRY_ARGS[@]}" "$@"
