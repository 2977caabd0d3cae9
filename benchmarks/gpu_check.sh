#!/usr/bin/env bash
# One prepared check of albef on one GPU, in at most 9 minutes, ending in one table (benchmarks/gpu_report.py):
#   1. the input pipeline alone (benchmarks/loader.py): samples/s per worker and with N workers, seeding cost;
#   2. one pretraining step at the official architecture (ViT-B/16 @256 + BERT-base, batch 64), bf16 and fp32
#      without TF32, beside the unmodified official code (../shared/tools/official-speed), with FLOPs per
#      sample, share of the measured bf16 peak, peak memory and a host-synchronisation check; a compiled row;
#   3. retrieval evaluation on the GPU against the official per-query algorithm (base, 384 px, k_test 128);
#   4. the GPU profile of the embedded benchmark: every pipeline stage (benchmarks/pipeline_run.py, no DVC),
#      its wall time and metrics, and the trainer's logged samples/s against the pure step rate at that config.
# Every part has its own time limit (540 s in all), so the check always ends with a table of what finished.
#
# Needs only torch, torchvision, transformers, timm, safetensors, tokenizers, Pillow, numpy and PyYAML.
#
#   bash benchmarks/gpu_check.sh --out gpu-check [--official DIR]     # on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke --out /tmp/smoke             # every part, tiny, on CPU (CI runs this)
#
# --official DIR: a copy of ../shared/tools/official-speed (official_step.py, official/, wheels/); default:
# that folder when it is there. PYTHON overrides the interpreter (default .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
out=gpu-check
official=../shared/tools/official-speed
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --out) out=$2; shift ;;
    --official) official=$2; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
started=$(date +%s)

# part NAME LIMIT_S COMMAND...: run one part under its limit, its output in $out/NAME.log, its status noted.
part() {
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit} s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -eq 124 ] && status="timed out after ${limit} s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed (exit $rc)"
  echo "$name $(( $(date +%s) - t0 )) $status" >> "$out/parts.txt"
  echo "   $status in $(( $(date +%s) - t0 )) s"
  [ "$status" = ok ] || tail -n 15 "$out/$name.log"
}
: > "$out/parts.txt"

official_site=""
if [ -f "$official/official_step.py" ]; then
  official_site=$(mktemp -d)
  # the official code's pinned transformers/timm are pure-Python wheels: unpack, no pip or network needed
  "$py" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
      "$official_site" "$official"/wheels/*.whl
fi

if [ $smoke -eq 1 ]; then
  part loader 120 "$py" benchmarks/loader.py --smoke --json "$out/loader.json"
  part step 120 "$py" benchmarks/train_step.py --device cpu --presets tiny --steps 2 --warmup 1 \
      --json "$out/step.json"
  part retrieval 120 "$py" benchmarks/retrieval_eval.py --smoke --json "$out/retrieval.json"
  part pipeline 400 "$py" benchmarks/pipeline_run.py --profile smoke --in-process --work "$out/pipeline" \
      --json "$out/pipeline.json"
  "$py" -m albef profile smoke --write "$out/params-profile.yaml" > /dev/null
  part profile_step 120 "$py" benchmarks/train_step.py --device cpu --model-params "$out/params-profile.yaml" \
      --batch-size 4 --steps 3 --warmup 1 --json "$out/profile_step.json"
else
  part loader 30 "$py" benchmarks/loader.py --sizes 96,256 --workers 0,4,8 --samples 256 \
      --json "$out/loader.json"
  part step 75 "$py" benchmarks/train_step.py --device cuda --presets base --image-size 256 \
      --queue-size 65536 --batch-size base=64 --dtypes bf16,fp32 --steps 10 --warmup 3 --json "$out/step.json"
  part step_b128 35 "$py" benchmarks/train_step.py --device cuda --presets base --image-size 256 \
      --queue-size 65536 --batch-size base=128 --dtypes bf16 --steps 10 --warmup 3 --json "$out/step_b128.json"
  part step_compiled 70 "$py" benchmarks/train_step.py --device cuda --presets base --image-size 256 \
      --queue-size 65536 --batch-size base=128 --dtypes bf16 --steps 10 --warmup 5 --compile \
      --json "$out/step_compiled.json"
  if [ -n "$official_site" ]; then
    for mode in none bf16; do
      part "official_$mode" 35 env PYTHONPATH="$official_site" "$py" "$official/official_step.py" --device cuda \
          --batch 64 --steps 10 --warmup 3 --autocast "$mode" --official-dir "$official/official"
    done
  fi
  part retrieval 50 "$py" benchmarks/retrieval_eval.py --device cuda --preset base --random-text --images 300 \
      --captions 5 --k-test 128 --image-size 384 --json "$out/retrieval.json"
  "$py" -m albef profile gpu --write "$out/params-profile.yaml" > /dev/null
  part profile_step 20 "$py" benchmarks/train_step.py --device cuda --model-params "$out/params-profile.yaml" \
      --batch-size 128 --dtypes bf16 --steps 20 --warmup 5 --json "$out/profile_step.json"
  # in one process: the stages' interpreter starts (about 5 s each) would take a third of the budget
  part pipeline 190 "$py" benchmarks/pipeline_run.py --profile gpu --in-process --work "$out/pipeline" \
      --json "$out/pipeline.json"
fi

echo "== all parts: $(( $(date +%s) - started )) s"
"$py" benchmarks/gpu_report.py "$out" | tee "$out/report.md"
