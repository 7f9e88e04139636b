#!/usr/bin/env bash
# Launch a recipe on one or many GPUs/nodes through `accelerate launch`.
#   launch/train.sh RECIPE ACCELERATE_CONFIG [key.sub=value ...]
# Environment (defaults in brackets):
#   NUM_PROCESSES      total processes over all nodes [GPUs on this node x NUM_MACHINES]
#   NUM_MACHINES       nodes [1]          MACHINE_RANK       this node's rank [0]
#   MAIN_PROCESS_IP    rank-0 node [127.0.0.1]              MAIN_PROCESS_PORT  [29500]
# Without GPUs (tests, laptops) the same configs run on CPU processes over gloo (DS_ACCELERATOR=cpu).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi
recipe=$1
config=$2
shift 2
num_machines=${NUM_MACHINES:-1}
gpus_per_node=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
exec accelerate launch \
  --config_file "$config" \
  --num_processes "${NUM_PROCESSES:-$((gpus_per_node * num_machines))}" \
  --num_machines "$num_machines" \
  --machine_rank "${MACHINE_RANK:-0}" \
  --main_process_ip "${MAIN_PROCESS_IP:-127.0.0.1}" \
  --main_process_port "${MAIN_PROCESS_PORT:-29500}" \
  -m vidtune.train.cli train "$recipe" "$@"
