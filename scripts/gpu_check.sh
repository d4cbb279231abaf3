#!/usr/bin/env bash
# The GPU checks of xkd, as one prepared script for a session that is lent a CUDA machine:
#   1. the tests' CUDA cases (make test-gpu),
#   2. bench/train_bench.py on the GPU (engine vs bare loop, KD vs scratch epoch, bf16 vs fp32),
#   3. every config in configs/ at small sizes with device=cuda (runs, comparisons over one seed, studies).
# Logs and JSON go to $OUT (or ./gpu_check when OUT is unset). DEVICE=cpu runs the same commands on
# the CPU, to check the script itself. Needs the package importable (pip install -e . or PYTHONPATH=src)
# and the Fashion-MNIST files (XKD_FASHION_MNIST or the Debian package) for the Fashion-MNIST configs.
set -uo pipefail
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }
run() { local name=$1; shift; step "$name"; "$@" >"$OUT/$name.log" 2>&1; local rc=$?; echo "   rc=$rc" | tee -a "$OUT/summary.txt"; [ $rc -eq 0 ] || status=1; }

if [ "$DEVICE" = cuda ]; then
  run test_gpu $PY -m pytest -q -m cuda -p no:cacheprovider
fi
run train_bench $PY bench/train_bench.py --device "$DEVICE" --repeats 3
cp bench/results/train.json "$OUT/train.json" 2>/dev/null || true

small=(--set device="$DEVICE" --set output_dir="$OUT/runs" --set train.epochs=1 --set teacher.train.epochs=1
       --set evaluation.num_images=32 --set evaluation.met_images=8 --set evaluation.sanity_images=4 --no-progress)
fm=(--set data.train_size=2000 --set data.val_size=500 --set data.test_size=500)
run run_default $PY -m xkd.cli run --config configs/default.yaml "${small[@]}" "${fm[@]}"
run run_lesions $PY -m xkd.cli run --config configs/lesions.yaml "${small[@]}" --set 'data.params={num_per_class: 60, size: 64}'
run compare_medtex $PY -m xkd.cli compare --config configs/medtex_lesions.yaml --seeds 1 "${small[@]}" --set 'data.params={num_per_class: 60, size: 64}'
run compare_xdistill $PY -m xkd.cli compare --config configs/xdistill.yaml --seeds 1 "${small[@]}"
run compare_kdfmv_gpu $PY -m xkd.cli compare --config configs/kdfmv_gpu.yaml --seeds 1 "${small[@]}" "${fm[@]}"
run study_kd_vs_ls $PY -m xkd.cli study kd-vs-ls --config configs/study_kd_vs_ls.yaml --seeds 1 "${small[@]}"
run study_capacity_gap $PY -m xkd.cli study capacity-gap --config configs/study_capacity_gap.yaml --seeds 1 "${small[@]}" "${fm[@]}"
step "done (status $status)"
exit $status
