#!/usr/bin/env bash
# Ablations on RoBERTa / SNLI with LoRA (rank $RANK): training-set composition (low-entropy only,
# high-entropy only, balanced), label noise on clean examples (30%, 60%) and soft labels (KL to the
# annotator distribution). The matching baseline (composition all, no noise, CE) is in the main matrix.
source "$(dirname "$0")/common.sh"
RANK=${RANK:-8}
model=roberta-base
for seed in $SEEDS; do
  base=(--model_name_or_path "$(model_path $model)" $(data_args snli) $(method_args lora $RANK) --seed $seed)
  for comp in low high balanced; do
    launch "${model}-snli-lora-r$RANK-comp_$comp-s$seed" "${base[@]}" --composition $comp
  done
  for noise in 0.3 0.6; do
    launch "${model}-snli-lora-r$RANK-noise$noise-s$seed" "${base[@]}" --label_noise $noise
  done
  launch "${model}-snli-lora-r$RANK-softkl-s$seed" "${base[@]}" --loss soft_kl
done
