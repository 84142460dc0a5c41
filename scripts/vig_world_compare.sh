#!/usr/bin/env bash
# Plain against VIG-selective instruction tuning on a grounded world, the VIG paper's way
# (docs/method.md §3, docs/results/vig.md):
#   bash scripts/vig_world_compare.sh SEED WORLD_DIR [OUT_DIR]
# 1. the alignment-only LLaVA of the world (language-model stage, then the projector on captions)
# 2. VIG of every SFT record, scored by that model (blur)
# 3. instruction tuning from it, both arms 3 epochs (plain: every sample and token; VIG: top 70%, τ mask)
# 4. POPE and CHAIR of both arms (the aligned model's own are in OUT/aligned/eval)
# Table: python scripts/vig_compare_table.py OUT_DIR ...
set -e
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 WANDB_MODE=disabled
CSR="${PYTHON:-python} -m csr.cli"
s=$1; W=$2; S=${3:-data/world-vig/s$s}; A=$S/aligned
T() { /usr/bin/time -f "[time] %e s: $*" "$@"; }
T $CSR world align --world $W --out $A --seed $s --eval
T $CSR vig score --model $A --data $W/train/sft.jsonl --image-root $W/train --out $S/vig_blur --content-free blur --batch-size 64 --device cpu
COMMON="num_train_epochs=3 per_device_train_batch_size=32 learning_rate=1e-3 warmup_steps=0.03 activation_checkpointing=false save_strategy=no logging_steps=50 seed=$s"
for arm in none vig; do
  T $CSR vig train --model $A --scores $S/vig_blur --out $S/it_$arm --selection $arm --full $COMMON
  T $CSR eval --model $S/it_$arm/model --pope $W/test/pope.jsonl --chair $W/test/chair.jsonl --out $S/eval_$arm --batch-size 64 --device cpu
done
echo "seed $s done: $S"
