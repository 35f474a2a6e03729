#!/usr/bin/env bash
# The demo job: set up the environment if needed, generate a synthetic keypoint dataset, train the
# tiny model for a few minutes with 2 processes under torchrun on the CPU, evaluate it (COCO OKS),
# and say where everything is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
DATA=${DATA:-data/synthetic}
OUT=${OUT:-runs/demo}
if [ ! -f "$DATA/annotations/person_keypoints_val2017.json" ]; then
    .venv/bin/python -m dist_kp.data.synthetic --out "$DATA" --train 160 --val 40 --seed 0
fi
OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=2 -m dist_kp.train \
    --config configs/synthetic_cpu.yaml data.root="$DATA" output_dir="$OUT" train.epochs=8 \
    schedule.milestones="[6]" "$@"
.venv/bin/python -m dist_kp.report "$OUT"
echo
echo "outputs in $OUT:"
echo "  $OUT/config.yaml       resolved config"
echo "  $OUT/metrics.jsonl     one record per logged step (losses, lr, img/s)"
echo "  $OUT/checkpoints/      resumable checkpoints (run the same command again to continue)"
echo "  $OUT/model_final.pt    weights for python -m dist_kp.predict / dist_kp.evaluate"
echo "  $OUT/eval/<step>/      metrics.json, results.json, predictions.png (ground truth | prediction)"
echo "  $OUT/report/           losses.png lr.png throughput.png ap.png predictions.png (python -m dist_kp.report $OUT)"
