#!/usr/bin/env bash
# Any atspeed stage on several processes and nodes with torchrun (torch.distributed.run). Run it on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=8 scripts/torchrun.sh fit --config configs/beauty/target_sft.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC_PER_NODE=8 scripts/torchrun.sh fit --config configs/beauty/target_sft.yaml
# torchrun starts NPROC_PER_NODE processes per node; Lightning detects its environment (TorchElasticEnvironment) and
# does not launch processes itself; trainer.num_nodes and trainer.devices are set to match, and atspeed checks them
# against torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE before anything is built. data.batch_size is per process.
# Variables: NNODES (1), NODE_RANK (0), NPROC_PER_NODE (1), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# PYTHON (.venv/bin/python when it exists, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
nnodes=${NNODES:-1}
nproc=${NPROC_PER_NODE:-1}
exec "$python" -m torch.distributed.run \
    --nnodes "$nnodes" --nproc_per_node "$nproc" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m atspeed "$@" --trainer.num_nodes "$nnodes" --trainer.devices "$nproc"
