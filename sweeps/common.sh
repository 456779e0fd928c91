# Shared by the sweep wrappers: the environment variables of the former bash loops, mapped onto the
# runner (python -m hf_entropy_callback.sweeps; see `hf-entropy-sweep --help`). Arguments given to a
# wrapper are passed to the runner (e.g. --jobs 2, --gpus 0,1, --dry-run, --slurm ...).
#   MODELS   folder holding one sub-folder per model (roberta-base, bert-base-uncased, ...), or
#            empty to pass hub ids (needs the internet)
#   DATA     the data folder (default ../shared/data)
#   OUT      where run directories go (default runs/)
#   SEEDS    seeds (default: each matrix's own)
#   LAUNCH   the launcher (default "accelerate launch"; e.g. "torchrun --nproc_per_node 2 --")
#   DRY_RUN  1 = print the commands instead of running them
#   EXTRA    flags added to every run (e.g. "--bf16 true"; split on spaces: use the runner's --extra
#            for values holding spaces)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUNNER_ARGS=(--data "${DATA:-../shared/data}" --out "${OUT:-runs}" --launcher "${LAUNCH:-accelerate launch}")
if [ -n "${MODELS:-}" ]; then RUNNER_ARGS+=(--models-dir "$MODELS"); fi
if [ -n "${SEEDS:-}" ]; then read -r -a _seeds <<< "$SEEDS"; RUNNER_ARGS+=(--seeds "${_seeds[@]}"); fi
if [ "${DRY_RUN:-0}" = 1 ]; then RUNNER_ARGS+=(--dry-run); fi
EXTRA_ARGS=()
if [ -n "${EXTRA:-}" ]; then read -r -a _extra <<< "$EXTRA"; EXTRA_ARGS=(--extra "${_extra[@]}"); fi

run_matrix() {  # matrix name, then runner flags
  exec python -m hf_entropy_callback.sweeps --matrix "$@" "${RUNNER_ARGS[@]}" "${EXTRA_ARGS[@]}"
}
