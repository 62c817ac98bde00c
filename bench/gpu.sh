#!/usr/bin/env bash
# The GPU correctness checks and benchmarks, for one call of a lent GPU machine (see bench/RESULTS.md).
# Writes JSON results under ${OUT:-bench/out}. Uses the machine's own python3 (PyTorch + transformers).
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
[ "${SKIP_CHECK:-0}" = 1 ] || $PY bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
lf() { name=$1; shift; echo "== $name: lmforge bench $*"; $PY -m lmforge bench "$@" --json > "$OUT/$name.json" 2> "$OUT/$name.err" \
       && $PY -c "import json,sys; from lmforge.bench import format_result; print(format_result(json.load(open(sys.argv[1]))))" "$OUT/$name.json" \
       || tail -5 "$OUT/$name.err"; }
for spec in ${BENCHES:-train124 gen1 gen64}; do
  case $spec in
    train124)   lf train124 train --preset gpt2-124m --batch-size 12 --rounds 5 --steps 10 ;;
    train124c0) lf train124c0 train --preset gpt2-124m --batch-size 12 --rounds 5 --steps 10 --set train.loss_chunk=0 ;;
    train124b32) lf train124b32 train --preset gpt2-124m --batch-size 32 --rounds 5 --steps 10 ;;
    trainac)    lf trainac train --preset gpt2-124m --batch-size 12 --rounds 3 --steps 5 --no-reference --set train.activation_checkpointing=true ;;
    gen64nc)    lf gen64nc generate --preset gpt2-124m --batch-size 64 --rounds 5 --no-compile ;;
    gen1)       lf gen1 generate --preset gpt2-124m --batch-size 1 --rounds 5 ;;
    gen64)      lf gen64 generate --preset gpt2-124m --batch-size 64 --rounds 5 ;;
    gen1nc)     lf gen1nc generate --preset gpt2-124m --batch-size 1 --rounds 5 --no-compile ;;
  esac
done
if [ "${E2E:-0}" = 1 ]; then  # the product path on the GPU: prepare -> train (compiled, bf16) -> eval -> generate
  set -e; D=$(mktemp -d)
  $PY -m lmforge prepare --input lmforge --out $D/data --vocab-size 512
  $PY -m lmforge train --data $D/data --out $D/run --preset debug --max-steps 40 --set train.log_interval=10
  tail -2 $D/run/metrics.jsonl
  $PY -m lmforge eval $D/run --samples 1
  $PY -m lmforge generate $D/run --prompt "def " --max-new-tokens 30 --temperature 0
fi
