#!/usr/bin/env bash
# The GPU checklist, for a session lent a GPU (one prepared run of the device tool):
#   bash benchmarks/gpu_session.sh OUTDIR [STAGE ...]      stages: tests tune bench decode (default: all)
# installs moec into the machine's python3 (its own torch/triton), then
#   tests   the Triton tests on the GPU (MOEC_TEST_DEVICE=cuda) and benchmarks/gpu_checks.py (ties, weights
#           changed after compile, saturation, bf16/fp32, with the Triton backend)
#   tune    tile tuning (written to OUTDIR/configs, read by the stages after it; several minutes)
#   bench   the layer table (bf16, int8, int4) at Mixtral-8x7B / Qwen3-30B-A3B / DeepSeek-V3 shapes
#   decode  whole-model generation, bf16 and fp32, HF vs moec
# Each stage has a time limit and writes OUTDIR/<stage>.log; a stage cut short keeps what it printed.
set -u
out=${1:?usage: gpu_session.sh OUTDIR [STAGE ...]}
shift
stages=${*:-tests tune bench decode}
mkdir -p "$out/configs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MOEC_TRITON_CONFIGS="$out/configs"

stage() {  # stage NAME SECONDS CMD...: run CMD under a time limit, log to OUTDIR/NAME.log, show its end
  local name=$1 secs=$2; shift 2
  [[ " $stages " == *" ${name%%-*} "* ]] || return 0
  echo "== $name (limit ${secs}s) $(date +%T)"
  timeout "$secs" "$@" >"$out/$name.log" 2>&1
  echo "   rc=$? $(date +%T)"
  tail -n 25 "$out/$name.log"
}

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/env.log" 2>&1 || { cat "$out/env.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"; } >>"$out/env.log" 2>&1
cat "$out/env.log"
stage tests 50 env MOEC_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_triton.py \
  -k "not compile_for_gpu and not backend_choice"
stage tests-checks 50 python3 benchmarks/gpu_checks.py
stage tune 300 python3 benchmarks/tune_triton.py --all --space fast --jobs 14 --tokens 1 16 64 256 4096 \
  --out "$out/configs"
stage bench 110 python3 benchmarks/bench_triton.py --quantized --no-torch-compile
stage decode-bf16 50 python3 benchmarks/bench_gpu_decode.py --rounds 2
stage decode-fp32 40 python3 benchmarks/bench_gpu_decode.py --rounds 1 --dtype fp32 --layers 2
