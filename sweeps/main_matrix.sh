#!/usr/bin/env bash
# The study's main matrix: model x method x dataset x seed (table 2 of the study).
# Encoders: LoRA at a low and a high rank and full fine-tuning, on SNLI and MNLI (DeBERTa v3: SNLI
# only); decoders: LoRA at both ranks on SNLI; IA3 on RoBERTa / SNLI. See common.sh for settings.
source "$(dirname "$0")/common.sh"
LOW_RANK=${LOW_RANK:-8}
HIGH_RANK=${HIGH_RANK:-64}
for seed in $SEEDS; do
  for model in roberta-base bert-base-uncased distilbert-base-uncased microsoft/deberta-v3-base; do
    tasks="snli mnli"; [ "$model" = microsoft/deberta-v3-base ] && tasks="snli"
    for task in $tasks; do
      for m in "lora $LOW_RANK" "lora $HIGH_RANK" "full 0"; do
        set -- $m
        tag=$1; [ "$1" = lora ] && tag="lora-r$2"
        launch "${model##*/}-$task-$tag-s$seed" --model_name_or_path "$(model_path $model)" $(data_args $task) \
          $(method_args $1 $2) --seed $seed
      done
    done
  done
  for model in Qwen/Qwen2.5-1.5B Qwen/Qwen2.5-3B; do
    for r in $LOW_RANK $HIGH_RANK; do
      launch "${model##*/}-snli-lora-r$r-s$seed" --model_name_or_path "$(model_path $model)" $(data_args snli) \
        $(method_args lora $r) --seed $seed
    done
  done
  launch "roberta-base-snli-ia3-s$seed" --model_name_or_path "$(model_path roberta-base)" $(data_args snli) \
    $(method_args ia3) --seed $seed
done
