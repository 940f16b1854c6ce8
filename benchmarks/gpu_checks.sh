#!/usr/bin/env bash
# The checks CPU CI cannot run, on one CUDA GPU, most wanted first, inside a time budget:
#   1. the CUDA tests (the fast paths against CPU, bf16 autocast, CUDA checkpoints, the gpu suite's smoke test);
#   2. `python -m benchmarks --suite gpu` (ViT-B/16 and ConvNeXt-T at 224 px, bf16, eager and torch.compile);
#   3. `benchmarks/speed.py --device cuda` (RepL's step against its limit, bf16 + torch.compile), written to
#      benchmarks/speed-cuda/ so that the CPU table in benchmarks/speed/ stays.
# Usage, from a checkout: bash benchmarks/gpu_checks.sh OUTDIR [SECONDS]  (default 540 s; PYTHON=python3)
# Each step gets what the earlier ones left, less a margin, so the last lines always run: OUTDIR receives
# summary.txt (each step's exit status, or why it was skipped), one log per step, nvidia-smi.txt and
# results.tgz (the suites' folders); it exits 1 if a step failed, was cut off or skipped. The suites are
# resumable: run it again to go on where the budget stopped.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_checks.sh OUTDIR [SECONDS]}
budget=${2:-540}
python=${PYTHON:-python3}
if ! [[ $budget =~ ^[0-9]+$ ]] || ((budget < 60)); then
  echo "gpu_checks.sh: SECONDS must be a whole number of seconds, at least 60 (got '$budget')" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$out"
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_checks.sh: no CUDA device visible to $python (torch.cuda.is_available() is False): run it on a GPU machine" \
    | tee "$out/summary.txt" >&2
  exit 2
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  > "$out/summary.txt" 2>&1
margin=30  # seconds kept back for the steps after a cut-off one and for packing the results
failed=0  # steps that failed, were cut off or were skipped: the script's exit status says so

step() {
  local name=$1; shift
  local left=$((budget - SECONDS - margin))
  if ((left < 30)); then
    echo "$name: skipped, the budget is spent" >> "$out/summary.txt"
    failed=$((failed + 1))
    return
  fi
  PYTHONUNBUFFERED=1 timeout "$left" "$@" > "$out/$name.log" 2>&1
  local status=$?
  ((status == 0)) || failed=$((failed + 1))
  echo "$name: exit status $status$([ $status = 124 ] && echo ' (cut off by the budget)') after ${SECONDS} s" \
    >> "$out/summary.txt"
}

step cuda-tests "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_benchmark.py -k "cuda"
step gpu-suite "$python" -m benchmarks --suite gpu
step speed-cuda "$python" benchmarks/speed.py --device cuda --output-dir benchmarks/speed-cuda
tar czf "$out/results.tgz" --ignore-failed-read benchmarks/gpu benchmarks/speed-cuda 2>> "$out/summary.txt"
cat "$out/summary.txt"
((failed == 0)) || { echo "gpu_checks.sh: $failed of 3 steps failed or did not run (summary above)" >&2; exit 1; }
