#!/usr/bin/env bash
# Rank sweep (figure 5 of the study): RoBERTa and BERT on SNLI, one seed (SEED, default 42), six LoRA
# ranks (RANKS, default "2 4 8 16 32 64") plus full FT: 14 runs, 6 of them shared with the main matrix.
source "$(dirname "$0")/common.sh"
read -r -a _ranks <<< "${RANKS:-2 4 8 16 32 64}"
if [ -z "${SEEDS:-}" ]; then RUNNER_ARGS+=(--seeds "${SEED:-42}"); fi
run_matrix rank_sweep --sweep-ranks "${_ranks[@]}" "$@"
