#!/usr/bin/env bash
# Two torchrun "nodes" on one machine: the multi-node code path (c10d rendezvous, node ranks,
# GROUP_RANK) without a cluster. Each node runs NPROC workers (default 1; gloo on CPU).
#
#   launch/multinode-local.sh --config configs/shakespeare-char.toml --train.max_steps 20
#   NPROC=2 PORT=29600 launch/multinode-local.sh ...
set -uo pipefail
PORT=${PORT:-29555}
NPROC=${NPROC:-1}
MODULE=${MODULE:-distlstm.train}
PYTHON=${PYTHON:-python}

pids=()
# torchrun restarts (--max-restarts) otherwise let new workers read the dead ones' gloo
# addresses from the shared rendezvous store and fail or hang (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
for node in 0 1; do
  # No --node_rank: c10d rendezvous assigns node ranks (torchrun ignores the flag with c10d).
  # Both "nodes" see 127.0.0.1 as local; torchrun hosts the rendezvous store in one of them and
  # the other connects as a client.
  "$PYTHON" -m torch.distributed.run --nnodes=2 --nproc_per_node="$NPROC" \
    --rdzv_id=distlstm-local --rdzv_backend=c10d --rdzv_endpoint="127.0.0.1:$PORT" \
    -m "$MODULE" "$@" &
  pids+=($!)
  echo "multinode-local: node $node: torchrun pid $!, rendezvous 127.0.0.1:$PORT" >&2
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit "$rc"
