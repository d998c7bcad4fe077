#!/usr/bin/env bash
# UL2 pre-training on a Cloud TPU VM slice (e.g. a TPU v4-256 pod slice): creates the
# slice unless it exists, copies this checkout (committed files) to every worker,
# installs it, and runs `ul2 train --gin_file=gin/runs/pretrain_ul2.gin` on all
# workers at once (--worker=all). On TPU VMs jax.distributed finds the coordinator,
# the process count and each worker's index itself.
#
#   TPU_NAME=ul2-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-256 launch/tpu_pod.sh \
#       --model_dir=gs://BUCKET/ul2_20b --gin.TFDS_DATA_DIR="'gs://BUCKET/tfds'"
#
# Every worker writes its part of each checkpoint to the model_dir: a gs:// path
# (no mount needed; the workers' own credentials) or a shared file system.
#
# Arguments are passed to `ul2 train` (more --gin_file flags are parsed after
# pretrain_ul2.gin; --gin.NAME=VALUE overrides). Environment: TPU_NAME and ZONE
# (required), ACCELERATOR_TYPE (v4-256), RUNTIME_VERSION (tpu-ubuntu2204-base),
# PROJECT (gcloud's default), SPOT=1 (spot VMs), SETUP=0 (skip copy and install),
# DETACH=1 (run under nohup, logging to ~/ul2_train.log on each worker).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
accelerator=${ACCELERATOR_TYPE:-v4-256}
runtime=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then where+=(--project="$PROJECT"); fi

if ! "${tpu[@]}" describe "$TPU_NAME" "${where[@]}" > /dev/null 2>&1; then
  create=(--accelerator-type="$accelerator" --version="$runtime")
  if [[ "${SPOT:-0}" == 1 ]]; then create+=(--spot); fi
  "${tpu[@]}" create "$TPU_NAME" "${where[@]}" "${create[@]}"
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ "${SETUP:-1}" == 1 ]]; then
  jax_version=$(sed -n 's/.*"jax==\([^"]*\)".*/\1/p' "$repo/pyproject.toml")
  tarball=$(mktemp -t ul2.XXXXXX.tar.gz)
  git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
  "${tpu[@]}" scp "$tarball" "$TPU_NAME:ul2.tar.gz" --worker=all "${where[@]}"
  # Python 3.11 through uv (TPU VM images ship an older python3), then jax[tpu].
  "${tpu[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" --command="set -e
    rm -rf ul2 && mkdir ul2 && tar -xzf ul2.tar.gz -C ul2 && cd ul2
    python3 -m pip install --user --quiet uv
    ~/.local/bin/uv venv --quiet --python 3.11 .venv
    ~/.local/bin/uv pip install --quiet --python .venv/bin/python -e . 'jax[tpu]==$jax_version'"
fi

printf -v train_args ' %q' "$@"
run=".venv/bin/ul2 train --gin_file=gin/runs/pretrain_ul2.gin$train_args"
if [[ "${DETACH:-0}" == 1 ]]; then
  run="nohup $run > ~/ul2_train.log 2>&1 < /dev/null &"
fi
"${tpu[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" --command="cd ul2 && $run"
