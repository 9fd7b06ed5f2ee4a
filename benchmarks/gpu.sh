#!/usr/bin/env bash
# The GPU checks and benchmark, as one command for a machine with a CUDA GPU:
#   1. correctness on the GPU: the tiny model in float32, every method's tokens equal to the
#      engine's for every condition and the recorded attention flow equal to eager's;
#   2. the Qwen2.5-Omni-3B thinker architecture (random weights, bf16) on a 10 s clip's
#      token count: the paper's full sweep (73 conditions, 64 new tokens) by the engine, the
#      floor, the careful and the naive protocol, with peak GPU memory per method;
#   3. the 3B shape's sweep of 8 clips, clip by clip against 8 clips per batched decode
#      (`--batch-sweep 8`), and the full protocol end to end (`--end-to-end 8`: captions, flow,
#      lens, sweep, shift; one naive clip), each as a multiple of the H100/H200 datasheet limit.
# Reports go to $OUT (default reports/gpu). Wheels in .whl/ (a newer transformers, say) are
# installed into /tmp/site first when present. On one H200 the 3B part's naive protocol alone
# took 239 s; TINY_TIMEOUT and BIG_TIMEOUT (seconds) bound the two parts.
#
#     bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-reports/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"

status=0
timeout "${TINY_TIMEOUT:-300}" $PY -m avprobe bench --device cuda --dtype float32 --shape tiny --repeats 3 \
    --methods engine floor careful naive --out "$OUT/gpu-tiny.json" 2>&1 | tee "$OUT/gpu-tiny.log" || status=1
timeout "${BIG_TIMEOUT:-1800}" $PY -m avprobe bench --device cuda --dtype bfloat16 --shape qwen2.5-omni-3b \
    --repeats 3 --slow-repeats 1 --methods engine floor naive careful --memory \
    --out "$OUT/gpu-3b.json" 2>&1 | tee "$OUT/gpu-3b.log" || status=1
timeout "${BATCH_TIMEOUT:-900}" $PY -m avprobe bench --device cuda --dtype bfloat16 --shape qwen2.5-omni-3b \
    --repeats 1 --methods engine --batch-sweep 8 --end-to-end 8 --clips-per-batch 8 --naive-clips 1 \
    --out "$OUT/gpu-3b-batched.json" 2>&1 | tee "$OUT/gpu-3b-batched.log" || status=1
exit $status
