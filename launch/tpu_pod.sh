#!/bin/bash
# Runs the same command on every worker of a Cloud TPU VM pod slice; the
# hosts find each other through jax.distributed's TPU auto-detection.
# The workdir must be shared by all hosts (e.g. a gs:// bucket), and the
# repository installed on every worker first (pip install -e .).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/full.py:model=r101 gs://bucket/run
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU ZONE CONFIG[:ARG] WORKDIR [FLAGS...]}
zone=${2:?}
config=${3:?}
workdir=${4:?}
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd refseg_jax && python -m refseg_jax.main --distributed \
    --config='$config' --workdir='$workdir' $*"
