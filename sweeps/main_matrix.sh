#!/usr/bin/env bash
# The study's main matrix (table 2): 78 runs. Encoders: LoRA at a low and a high rank and full
# fine-tuning, on SNLI and MNLI (DeBERTa v3: SNLI only); decoders: LoRA at both ranks on SNLI; IA3 on
# RoBERTa / SNLI. LOW_RANK / HIGH_RANK (default 8 / 64); see common.sh for the other settings.
source "$(dirname "$0")/common.sh"
run_matrix main --main-ranks "${LOW_RANK:-8}" "${HIGH_RANK:-64}" "$@"
