#!/usr/bin/env bash
# The GPU checks of xkd, as one prepared script for a session that is lent a CUDA machine:
#   1. the tests' CUDA cases (make test-gpu),
#   2. bench/gradcam_bench.py on the GPU (Grad-CAM family vs captum / pytorch-grad-cam / one forward+backward),
#   3. bench/train_bench.py on the GPU (engine vs bare loop and their operators per step, KD, e2KD, CAT-KD,
#      CRD vs scratch epoch, bf16 vs fp32, fused vs default optimiser; 5 repeats: a GPU epoch here takes well
#      under a second), then again at configs/kdfmv_gpu.yaml's scale on 20,000 images,
#   4. every config in configs/ at small sizes with device=cuda (runs, comparisons over one seed, studies),
#      four at a time (they share the GPU; the benches before them run alone, so their timings are clean).
# Every step has its own time limit (STEP_LIMIT seconds, the tests TEST_LIMIT), so one slow step does not
# hide the others. Logs and JSON go to $OUT (or ./gpu_check when OUT is unset); summary.txt lists each
# step's exit status (124 = ran past its limit). DEVICE=cpu runs the same commands on the CPU, to check the
# script itself. Needs the package importable (pip install -e . or PYTHONPATH=src) and the Fashion-MNIST
# files (XKD_FASHION_MNIST or the Debian package) for the Fashion-MNIST configs.
set -uo pipefail
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu_check}
PY=${PY:-python3}
STEP_LIMIT=${STEP_LIMIT:-240}
TEST_LIMIT=${TEST_LIMIT:-240}
PARALLEL=${PARALLEL:-4}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }
run() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
}
step "device $DEVICE, $(date -u +%FT%TZ)"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1 | tee -a "$OUT/summary.txt"

if [ "$DEVICE" = cuda ]; then
  run test_gpu "$TEST_LIMIT" $PY -m pytest -q -m cuda -p no:cacheprovider
fi
run gradcam_bench "$STEP_LIMIT" $PY bench/gradcam_bench.py --device "$DEVICE" --out "$OUT/gradcam.json"
run train_bench "$STEP_LIMIT" $PY bench/train_bench.py --device "$DEVICE" --repeats 5 --distillers --out "$OUT/train.json"
# the same measures at KD-FMV's own scale (DenseNet121 teacher, the wide student, batch 256) on 20,000 images
run train_bench_kdfmv "$STEP_LIMIT" $PY bench/train_bench.py --device "$DEVICE" --config configs/kdfmv_gpu.yaml \
  --set data.train_size=20000 --repeats 3 --out "$OUT/train_kdfmv.json"

small=(--set device="$DEVICE" --set output_dir="$OUT/runs" --set train.epochs=1 --set teacher.train.epochs=1
       --set evaluation.num_images=32 --set evaluation.met_images=8 --set evaluation.sanity_images=4 --no-progress)
fm=(--set data.train_size=2000 --set data.val_size=500 --set data.test_size=500)
lesions='--set "data.params={num_per_class: 60, size: 64}"'
concepts='--set "data.params={num_per_class: 120, size: 64}"'
jobs=(
  "run_default|run --config configs/default.yaml ${small[*]} ${fm[*]}"
  "run_lesions|run --config configs/lesions.yaml ${small[*]}"
  "compare_medtex|compare --config configs/medtex_lesions.yaml --seeds 1 ${small[*]}"
  "compare_xdistill|compare --config configs/xdistill.yaml --seeds 1 ${small[*]}"
  "compare_kdfmv_gpu|compare --config configs/kdfmv_gpu.yaml --seeds 1 ${small[*]} ${fm[*]}"
  "study_kd_vs_ls|study kd-vs-ls --config configs/study_kd_vs_ls.yaml --seeds 1 ${small[*]} --set study.diffroar.epochs=1"
  "study_capacity_gap|study capacity-gap --config configs/study_capacity_gap.yaml --seeds 1 ${small[*]} ${fm[*]}"
  "study_explanation_transfer|study explanation-transfer --config configs/study_explanation_transfer.yaml --seeds 1 ${small[*]} ${fm[*]} --set study.data_fractions=[1.0,0.5]"
  "study_explanation_transfer_lesions|study explanation-transfer --config configs/study_explanation_transfer_lesions.yaml --seeds 1 ${small[*]} --set study.data_fractions=[1.0,0.5]"
  "sweep_kd|sweep --config configs/sweep_kd.yaml --trials 3 ${small[*]} ${fm[*]}"
)
for extra in configs/*.yaml; do  # configs added after this list was written run as plain runs
  case "$extra" in
    configs/default.yaml|configs/lesions.yaml|configs/medtex_lesions.yaml|configs/xdistill.yaml|configs/kdfmv_gpu.yaml) ;;
    configs/study_*|configs/sweep_*) ;;  # studies and sweeps need their own command: list them above
    *) jobs+=("run_$(basename "$extra" .yaml)|run --config $extra ${small[*]}") ;;
  esac
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
running=0
for job in "${jobs[@]}"; do
  name=${job%%|*}
  args=${job#*|}
  case "$name" in
    *lesions*|*medtex*) args="$args $lesions" ;;
    *kd_vs_ls*) args="$args $concepts" ;;  # 18 DiffROAR retrainings: the full concepts set ran past 150 s on the H200
  esac
  # word splitting of $args is intended; the data.params override is passed as one argument
  ( eval "run $name $STEP_LIMIT $PY -m xkd.cli $args" ) &
  running=$((running + 1))
  if [ "$running" -ge "$PARALLEL" ]; then wait -n; running=$((running - 1)); fi
done
wait
fails=$(grep -c 'rc=[1-9]' "$OUT/summary.txt")
step "done: $fails step(s) failed"
[ "$fails" -eq 0 ]
