#!/bin/bash
# Two processes on this machine joined by jax.distributed over loopback, each
# with 4 CPU devices: a multi-host run in miniature (each process reads its
# own half of the data, as each host of a pod does).
#
#   launch/loopback.sh configs/full.py:data=ref_shapes_tiny /tmp/loopback
set -euo pipefail
config=${1:?usage: launch/loopback.sh CONFIG[:ARG] WORKDIR [FLAGS...]}
workdir=${2:?usage: launch/loopback.sh CONFIG[:ARG] WORKDIR [FLAGS...]}
shift 2
port=${PORT:-12355}
export XLA_FLAGS=--xla_force_host_platform_device_count=4
pids=()
for i in 0 1; do
  python -m refseg_jax.main --config="$config" --workdir="$workdir" \
    --coordinator_address="127.0.0.1:$port" --num_processes=2 \
    --process_id="$i" "$@" > "$workdir.process$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
echo "logs: $workdir.process0.log $workdir.process1.log (exit $status)"
exit $status
