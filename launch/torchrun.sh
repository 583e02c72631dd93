#!/usr/bin/env bash
# Launch moedist on this node with torchrun (one process per GPU, or NPROC CPU processes).
#
#   launch/torchrun.sh train configs/tiny.yaml
#   NPROC=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh train configs/big.yaml   # on node0
#   NPROC=8 NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh train configs/big.yaml   # on node1
#   MOEDIST_ENTRY=tests/scripts/dist_smoke.py NPROC=2 launch/torchrun.sh      # a script instead of the CLI
#
# Env: NPROC (processes on this node; default: GPUs, else 1), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), MOEDIST_ENTRY (default "-m moedist.cli";
# a path runs that script, "-m pkg.mod" a module), TORCHRUN_ARGS (extra torchrun flags,
# e.g. "--max-restarts 1"). Arguments are passed to the entry unchanged.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NPROC=$(default_nproc)
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
entry_args -m
read -r -a EXTRA <<< "${TORCHRUN_ARGS:-}"

TORCHRUN=$(find_tool torchrun)
exec "$TORCHRUN" --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" ${EXTRA[@]+"${EXTRA[@]}"} \
    "${ENTRY_ARGS[@]}" "$@"
