#!/usr/bin/env bash
# Ablations on RoBERTa / SNLI with LoRA (rank RANK, default 8): training-set composition (low-entropy
# only, high-entropy only, balanced), label noise on clean examples (30%, 60%) and soft labels (KL to the
# annotator distribution): 18 runs. The matching baseline (composition all, no noise, CE) is in the main
# matrix; the runner's matrices composition / noise / soft_label include it.
source "$(dirname "$0")/common.sh"
run_matrix ablations --ablation-rank "${RANK:-8}" "$@"
