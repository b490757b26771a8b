#!/usr/bin/env bash
# The GPU check: on a bare machine with a CUDA GPU and a preinstalled torch (no network; it never
# pip-installs anything), in a few minutes:
#   1. build the rasterizer extension in place against that torch (CUDA kernel for this GPU),
#   2. pytest -m cuda (the GPU tier: kernel vs reference on CUDA, CUDA vs CPU, a training step),
#   3. bench_rasterizer --device cuda,
#   4. bench_train_step --device cuda --img_size 256 --batch_size 16 (the original's configuration),
#      again with --amp, and bench_network --device cuda --img_size 256 (layouts and precisions),
#   5. a 200-iteration train_s2 on synthetic birds (with the truth's semantic template).
# It writes OUT_DIR/summary.json (one entry per step: status, seconds, and the benchmark JSON or the
# last log line) and each step's log. Without a CUDA device it stops at once with exit status 3;
# with a PYTHON that cannot import torch, with exit status 2.
#
#   bash benchmarks/gpu_check.sh OUT_DIR          # PYTHON=python3 by default
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
steps=()

record() {  # record NAME STATUS SECONDS LOGFILE: the log's last JSON line, else its last line
  local detail
  detail=$(grep -E '^\{' "$4" 2>/dev/null | tail -n 1)
  [ -n "$detail" ] || detail=$("$py" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$(tail -n 1 "$4" 2>/dev/null)")
  steps+=("\"$1\": {\"status\": \"$2\", \"seconds\": $3, \"result\": $detail}")
}

step() {  # step NAME TIMEOUT COMMAND...: run, log to OUT_DIR/NAME.log, record
  local name=$1 limit=$2 start status
  shift 2
  start=$(date +%s)
  echo "gpu_check: $name: $*"
  if timeout "$limit" "$@" > "$out/$name.log" 2>&1; then status=ok; else status="failed ($?)"; fi
  record "$name" "$status" $(( $(date +%s) - start )) "$out/$name.log"
  echo "gpu_check: $name: $status"
}

write_summary() {
  local IFS=,
  echo "{${steps[*]}}" > "$out/summary.json"
  echo "gpu_check: summary in $out/summary.json"
}

if ! "$py" - > "$out/environment.log" 2>&1 <<'PY'
import json, shutil, subprocess, torch
info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "nvcc": shutil.which("nvcc")}
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                gpus=torch.cuda.device_count())
print(json.dumps(info))
PY
then
  record environment failed 0 "$out/environment.log"
  cat "$out/environment.log"
  echo "gpu_check: $py cannot import torch; run with PYTHON=<a python that has torch>" >&2
  write_summary
  exit 2
fi
record environment ok 0 "$out/environment.log"
cat "$out/environment.log"
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA device: nothing to check on this machine" >&2
  write_summary
  exit 3
fi

# 1. the extension, for this GPU only (a short build); the CPU kernel comes with it
arch=$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')
step build 600 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" "$py" setup.py build_ext --inplace
step kernels 60 "$py" -c 'import umr, sys; k = umr.available_kernels(); print(k); sys.exit(0 if "cuda" in k else 1)'

# 2. the GPU tier of the tests
step pytest_cuda 900 "$py" -m pytest -q -m cuda -p no:cacheprovider tests

# 3-4. benchmarks on the GPU
step bench_rasterizer 600 "$py" -m benchmarks.bench_rasterizer --device cuda
step bench_train_step 600 "$py" -m benchmarks.bench_train_step --device cuda --img_size 256 --batch_size 16
step bench_train_step_amp 600 "$py" -m benchmarks.bench_train_step --device cuda --img_size 256 --batch_size 16 --amp --no_64
step bench_network 300 "$py" -m benchmarks.bench_network --device cuda --img_size 256 --no_compile

# 5. 200 stage-2 iterations on synthetic birds, from the truth's semantic template
data="$out/synth_birds"
step data 600 "$py" -m umr.data.synth_birds --out "$data" --num_train 400 --num_val 20 --num_test 0 --photo_size 300
step template 300 "$py" -c "from umr.data.synth_birds import truth_template; print(truth_template('$data/gt/train.npz', '$out/template'))"
step train_s2 900 "$py" -m experiments.train_s2 --device cuda --name gpu_s2 --checkpoint_dir "$out/snapshots" \
  --vis_dir "$out/visualization" --dataset synth_birds --cub_dir "$data/CUB_200_2011" --cub_cache_dir "$data/cachedir/cub" \
  --scops_path "$data/scops" --stemp_path "$out/template" --img_size 256 --image_size 256 --batch_size 16 \
  --num_iter 200 --num_epochs 1000 --nopretrained_encoder --texture_loss l1 --val_freq 100 --val_images 20 \
  --val_pairs 20 --display_freq 0 --save_latest_freq 100 --n_data_workers 4
"$py" - "$out/snapshots/gpu_s2/loss_log.jsonl" > "$out/train_s2_summary.log" 2>&1 <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if "total" in r]
val = [r for r in rows if any(k.startswith("val/") for k in r)]
seconds = train[-1]["time"] / train[-1]["step"] if train else None
print(json.dumps({"steps": train[-1]["step"] if train else 0, "s_per_iter": seconds,
                  "first_total": train[0]["total"] if train else None, "last_total": train[-1]["total"] if train else None,
                  "validation": {k: v for k, v in (val[-1] if val else {}).items() if k.startswith("val/")}}))
PY
record train_s2_summary done 0 "$out/train_s2_summary.log"
write_summary
grep -q '"status": "failed' "$out/summary.json" && exit 1
exit 0
