#!/usr/bin/env bash
# Rank sweep (figure 5 of the study): RoBERTa and BERT on SNLI, one seed, six LoRA ranks plus full FT.
source "$(dirname "$0")/common.sh"
RANKS=${RANKS:-2 4 8 16 32 64}
seed=${SEED:-42}
for model in roberta-base bert-base-uncased; do
  for r in $RANKS; do
    launch "sweep-${model##*/}-snli-lora-r$r-s$seed" --model_name_or_path "$(model_path $model)" $(data_args snli) \
      $(method_args lora $r) --seed $seed
  done
  launch "sweep-${model##*/}-snli-full-s$seed" --model_name_or_path "$(model_path $model)" $(data_args snli) \
    $(method_args full) --seed $seed
done
