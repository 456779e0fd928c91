#!/usr/bin/env bash
# Matched learning rates: full FT vs LoRA r=8 at 1e-6, 5e-6, 1e-5, 5e-5, five seeds, SNLI and MNLI:
# 80 runs per model (default roberta-base; pass --models DIR_OR_ID ... for others).
source "$(dirname "$0")/common.sh"
run_matrix matched_lr "$@"
