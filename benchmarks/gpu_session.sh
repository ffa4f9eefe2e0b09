#!/usr/bin/env bash
# The GPU checklist, for a session lent a GPU (one prepared run of the device tool, ~9 minutes):
#   bash benchmarks/gpu_session.sh OUTDIR [STAGE ...]      stages: tests decode tune bench (default: all)
# installs moec into the machine's python3 (its own torch/triton), then
#   tests   the Triton and CUDA-graph tests on the GPU (MOEC_TEST_DEVICE=cuda) and benchmarks/gpu_checks.py (ties,
#           weights changed after compile, saturation, bf16/fp32, with the Triton backend)
#   decode  whole-model generation, bf16 and fp32: HF vs moec, eager and with cuda_graphs=True; then HF's own
#           static cache + torch.compile path (Mixtral layers; its compile takes most of that stage)
#   tune    tile tuning, bf16, 1-4096 tokens, small counts first (written to OUTDIR/configs, read by the stage
#           after it; a tuned entry serves token counts within 4x of its own)
#   bench   the layer table (bf16, int8, int4; eager and in CUDA graphs) at Mixtral-8x7B / Qwen3-30B-A3B /
#           DeepSeek-V3 shapes
# Each stage has a time limit and appends to OUTDIR/session.log (one file: the device tool brings back 8 at most);
# a stage cut short keeps what it printed. Tuned tiles: OUTDIR/configs/.
set -u
out=${1:?usage: gpu_session.sh OUTDIR [STAGE ...]}
shift
stages=${*:-tests decode tune bench}
mkdir -p "$out/configs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MOEC_TRITON_CONFIGS="$out/configs"

log=$out/session.log
stage() {  # stage NAME SECONDS CMD...: run CMD under a time limit, append its output to the log, show its end
  local name=$1 secs=$2 rc; shift 2
  [[ " $stages " == *" ${name%%-*} "* ]] || return 0
  echo "== $name (limit ${secs}s) $(date +%T): $*" | tee -a "$log"
  timeout "$secs" "$@" >"$out/stage.tmp" 2>&1
  rc=$?
  cat "$out/stage.tmp" >>"$log"
  echo "   rc=$rc $(date +%T)" | tee -a "$log"
  tail -n 25 "$out/stage.tmp"
  rm -f "$out/stage.tmp"
}

python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$log" 2>&1 || { cat "$log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"; } >>"$log" 2>&1
cat "$log"
stage tests 120 env MOEC_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 14 -rf \
  --tb=line tests/test_triton.py tests/test_cuda_graphs.py -k "not compile_for_gpu and not backend_choice"
stage tests-checks 45 python3 benchmarks/gpu_checks.py
stage decode-bf16 80 python3 benchmarks/bench_gpu_decode.py --rounds 2
stage decode-fp32 40 python3 benchmarks/bench_gpu_decode.py --rounds 1 --dtype fp32 --layers 2
stage tune 130 python3 benchmarks/tune_triton.py --space fast --jobs 14 --out "$out/configs"
stage bench 100 python3 benchmarks/bench_triton.py --quantized --graphs --no-torch-compile --tokens 1 4 16 64 256 4096
stage decode-hfcompile 40 python3 benchmarks/bench_gpu_decode.py --rounds 1 --models mixtral --hf-compile
