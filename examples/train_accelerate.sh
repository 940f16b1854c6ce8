#!/usr/bin/env bash
# RepL training with `accelerate launch`: one process, several GPUs, several nodes.
#
#   bash examples/train_accelerate.sh cpu-demo     # runs here: 2 processes on the CPU (gloo), then a
#                                                  # simulated 2-node run on 127.0.0.1 (~1 min)
#   bash examples/train_accelerate.sh single       # one process (GPU if there is one)
#   bash examples/train_accelerate.sh multi-gpu    # every GPU of this machine, bf16
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash examples/train_accelerate.sh multi-node   # on node 0
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash examples/train_accelerate.sh multi-node   # on node 1
#   bash examples/train_accelerate.sh fsdp         # every GPU of this machine, FSDP2 (--fsdp), bf16
#   bash examples/train_accelerate.sh fsdp-cpu-demo   # runs here: FSDP2 over 2 CPU processes (gloo)
#
# --batch-size is per process: the global batch is batch-size x processes x accumulation steps.
# Only the main process writes the output directory (model, results.json, checkpoints).
set -euo pipefail

MODE="${1:-cpu-demo}"
OUT="${OUT:-outputs/accelerate}"
TRAIN=(-m hf_replacement.commands.cli train --dataset digits --replace-interval 4 --checkpointing-steps 50)

case "$MODE" in
  single)
    accelerate launch --num_processes 1 "${TRAIN[@]}" --model vit-mini --epochs 30 --output-dir "$OUT/single"
    ;;
  multi-gpu)
    GPUS="${GPUS:-$(nvidia-smi --list-gpus | wc -l)}"
    accelerate launch --multi_gpu --num_processes "$GPUS" --mixed_precision bf16 \
      "${TRAIN[@]}" --model vit-small --mixed-precision bf16 --batch-size 32 --epochs 30 --output-dir "$OUT/multi-gpu"
    ;;
  multi-node)
    # Run the same command on every node; only NODE_RANK differs. GPUS_PER_NODE x NUM_NODES processes.
    GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
    NUM_NODES="${NUM_NODES:-2}"
    accelerate launch --multi_gpu --num_machines "$NUM_NODES" --machine_rank "${NODE_RANK:?set NODE_RANK}" \
      --num_processes $((GPUS_PER_NODE * NUM_NODES)) --main_process_ip "${MASTER_ADDR:?set MASTER_ADDR}" \
      --main_process_port "${MASTER_PORT:-29500}" --mixed_precision bf16 \
      "${TRAIN[@]}" --model vit-small --mixed-precision bf16 --batch-size 32 --epochs 30 --output-dir "$OUT/multi-node"
    ;;
  fsdp)
    # hf-replacement shards the model itself (each replaced block with its neighbours): no --use_fsdp.
    GPUS="${GPUS:-$(nvidia-smi --list-gpus | wc -l)}"
    accelerate launch --multi_gpu --num_processes "$GPUS" \
      "${TRAIN[@]}" --fsdp --model vit-small --mixed-precision bf16 --batch-size 32 --epochs 30 --output-dir "$OUT/fsdp"
    ;;
  fsdp-cpu-demo)
    export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1
    accelerate launch --multi_gpu --num_processes 2 "${TRAIN[@]}" --fsdp --model vit-mini --batch-size 32 --epochs 10 \
      --output-dir "$OUT/fsdp-cpu-2-processes"
    ;;
  cpu-demo)
    # Without a GPU, ACCELERATE_USE_CPU=1 makes --multi_gpu real DDP over gloo (a plain
    # `--cpu --num_processes 2` silently runs one process).
    export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1
    accelerate launch --multi_gpu --num_processes 2 "${TRAIN[@]}" --model vit-mini --batch-size 32 --epochs 10 \
      --output-dir "$OUT/cpu-2-processes"
    PORT="${MASTER_PORT:-29533}"
    PIDS=()
    for RANK in 0 1; do   # two "nodes" of one process each, on this machine
      accelerate launch --multi_gpu --num_machines 2 --machine_rank "$RANK" --num_processes 2 \
        --main_process_ip 127.0.0.1 --main_process_port "$PORT" \
        "${TRAIN[@]}" --model vit-mini --batch-size 32 --epochs 10 --output-dir "$OUT/cpu-2-nodes" &
      PIDS+=($!)
    done
    for PID in "${PIDS[@]}"; do wait "$PID"; done   # fails if either node failed
    ;;
  *)
    echo "usage: $0 cpu-demo|single|multi-gpu|multi-node|fsdp|fsdp-cpu-demo (got '$MODE')" >&2
    exit 2
    ;;
esac
