#!/bin/bash
# Trains on this machine's devices (CPU, one or more GPUs, or a TPU VM).
#
#   launch/local.sh configs/full.py /tmp/full [--config.total_steps=500 ...]
#
# Re-running the same command resumes from the workdir's last checkpoint.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG[:ARG] WORKDIR [FLAGS...]}
workdir=${2:?usage: launch/local.sh CONFIG[:ARG] WORKDIR [FLAGS...]}
shift 2
exec python -m refseg_jax.main --config="$config" --workdir="$workdir" "$@"
