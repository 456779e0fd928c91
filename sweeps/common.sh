# Shared by the sweep scripts: where things are, and how one run is launched.
#   MODELS   folder holding one sub-folder per model (roberta-base, bert-base-uncased, ...), or
#            empty to pass hub ids (needs the internet)
#   DATA     the data folder (default ../shared/data)
#   OUT      where run directories go (default runs/)
#   SEEDS    seeds (default "42 123 456")
#   LAUNCH   the launcher (default "accelerate launch"; e.g. "torchrun --nproc_per_node 2")
#   DRY_RUN  1 = print the commands instead of running them
#   EXTRA    flags added to every run (e.g. "--bf16 true")
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs}
SEEDS=${SEEDS:-42 123 456}
LAUNCH=${LAUNCH:-accelerate launch}
EXTRA=${EXTRA:-}

model_path() {  # hub id -> local folder under $MODELS when given
  if [ -n "${MODELS:-}" ]; then echo "$MODELS/${1##*/}"; else echo "$1"; fi
}

data_args() {  # task -> ChaosNLI file and bulk corpus
  case "$1" in
    snli) echo "--task snli --chaosnli_file $DATA/chaosnli/chaosNLI_snli.jsonl --train_file $DATA/snli/snli_train_subset.jsonl" ;;
    mnli) echo "--task mnli --chaosnli_file $DATA/chaosnli/chaosNLI_mnli_m.jsonl --train_file $DATA/mnli/mnli_train_subset.jsonl" ;;
    *) echo "unknown task $1" >&2; return 1 ;;
  esac
}

method_args() {  # method rank -> flags
  case "$1" in
    full) echo "--peft none" ;;
    lora) echo "--peft lora --lora_r $2" ;;  # --lora_r: torchrun's parser mistakes a bare --r
    ia3) echo "--peft ia3" ;;
  esac
}

launch() {  # name, then run_glue_entropy.py flags; skips runs that already finished
  local name=$1; shift
  local dir="$OUT/$name"
  if [ -f "$dir/entropy_tracking/summary.json" ]; then echo "done already: $dir"; return 0; fi
  local cmd="$LAUNCH run_glue_entropy.py $* --output_dir $dir --run_name $name $EXTRA"
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "$cmd"; else echo ">>> $cmd"; $cmd; fi
}
