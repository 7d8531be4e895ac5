#!/usr/bin/env bash
# The GPU check of the HF backend, in one call of at most 9 minutes (each step has its own timeout):
#   1. fp32 equivalence on CUDA, eager:       batched greedy == solo generate (gpu_equivalence.py)
#   2. the same with --cuda-graphs:            decode steps replayed as CUDA graphs
#   3. bench_hf.py --offline 512, bf16, random weights: ours, static, ceiling, transformers' CB
#   4. the same, ours only, with --cuda-graphs
#   5. fp32 equivalence with a shared ~200-token system prompt: prefix-cache hits on CUDA (issue 14)
#   6. a real CUDA out-of-memory error (the process capped to its weights + 300 MiB): the batch
#      halves and every request finishes (gpu_faults.py, issue 13)
# Results go to $OUT: gpu_check.log (every step's output), and bench_hf's JSON and PNG per run.
#
# Before the call, on a machine with the embedded model:   benchmarks/gpu_check.sh --stage
#   copies SmolLM2's config and tokenizer (3.5 MB) to out/gpu-stage/smollm2 (ignored by git).
#   For the real weights in steps 1-2, also put the GGUF there as out/gpu-stage/smollm2.gguf
#   (98 MB: carry it in two halves over two calls and `cat` them); without it steps 1-2 use
#   peaked random weights (SmolLM2's config, initializer_range 0.5: no near-ties).
# The call:   run(command="benchmarks/gpu_check.sh", carry=["out/gpu-stage"], timeout_s=570)
# Without a GPU the same steps run on the CPU at a small size: the fallback that tests this script.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=out/gpu-stage
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python

if [ "${1:-}" = "--stage" ]; then
  mkdir -p "$STAGE/smollm2"
  src=$($PY -c "from batcher.adapters.hf._load import embedded_model_dir; print(embedded_model_dir())")
  cp "$src"/config.json "$src"/generation_config.json "$src"/tokenizer* "$src"/chat_template.jinja "$STAGE/smollm2/"
  du -sh "$STAGE"
  exit 0
fi

OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
# Import this checkout (adapters/ as batcher.adapters) without installing it, where it is not installed.
if ! $PY -c "import batcher.adapters.hf" 2>/dev/null; then
  pkg=$(mktemp -d)
  mkdir -p "$pkg/batcher" && cp -r batcher/. "$pkg/batcher/" && cp -r adapters "$pkg/batcher/adapters"
  export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/gpu_check.log"
for m in anyio prometheus_client tqdm matplotlib; do
  $PY -c "import $m" 2>/dev/null || echo "missing module $m: carry its wheel" | tee -a "$OUT/gpu_check.log"
done

export PYTHONUNBUFFERED=1
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEV=cuda DTYPE=bfloat16 OFFLINE=512 BATCH=256 PROMPTS=64 GRAPHS=--cuda-graphs SLOW=1 ONLY=() EQ=18
else  # a shared 2-core CPU: small, generous timeouts, ours only in the benchmark
  DEV=cpu DTYPE=float32 OFFLINE=8 BATCH=8 PROMPTS=4 GRAPHS= SLOW=4 ONLY=(--only-batcher) EQ=5
  echo "no GPU: the CPU fallback at a small size, without CUDA graphs" | tee -a "$OUT/gpu_check.log"
fi
TOK=()
[ -d "$STAGE/smollm2" ] && TOK=(--tokenizer "$STAGE/smollm2")
if [ -f "$STAGE/smollm2.gguf" ]; then
  WEIGHTS=(--model "$STAGE/smollm2.gguf")
elif $PY -c "from batcher.adapters.hf._load import embedded_gguf; embedded_gguf()" 2>/dev/null; then
  WEIGHTS=()
else
  WEIGHTS=(--random-weights "${TOK[@]}")
fi

step() {  # step NAME TIMEOUT COMMAND...: run it, its output (less progress bars) into the log
  local name=$1 limit=$2 status
  shift 2
  echo "== $name (timeout ${limit}s): $*" | tee -a "$OUT/gpu_check.log"
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v "it/s\]" | tee -a "$OUT/gpu_check.log"
  status=${PIPESTATUS[0]}
  echo "== $name: exit $status after ${SECONDS}s in all" | tee -a "$OUT/gpu_check.log"
}

step equivalence $((90 * SLOW)) $PY benchmarks/gpu_equivalence.py --device $DEV --prompts $EQ "${WEIGHTS[@]}"
[ -n "$GRAPHS" ] && step equivalence-graphs 75 $PY benchmarks/gpu_equivalence.py --device $DEV $GRAPHS "${WEIGHTS[@]}"
BENCH=(benchmarks/bench_hf.py --device $DEV --dtype $DTYPE --random-weights "${TOK[@]}" --offline $OFFLINE
  --max-batch $BATCH --prompts $PROMPTS --out "$OUT")
step bench $((150 * SLOW)) $PY "${BENCH[@]}" "${ONLY[@]}"
[ -n "$GRAPHS" ] && step bench-graphs 100 $PY "${BENCH[@]}" --only-batcher $GRAPHS
step equivalence-prefix $((45 * SLOW)) $PY benchmarks/gpu_equivalence.py --device $DEV --prompts $EQ --system 200 --cascade-min-rows 4 "${WEIGHTS[@]}"
step out-of-memory 60 $PY benchmarks/gpu_faults.py "${WEIGHTS[@]}"
exit 0
