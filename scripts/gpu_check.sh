#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py has the whole story): environment, kernel tests on the device,
# attention backends, a bf16 training run stopped and resumed, an fp32 run with the kernels on and off, the recipe's
# step (kernels on / off, profiled) and the kernel benchmarks, DeepSpeed ZeRO-2 and ZeRO-3 in bf16. ~8 minutes.
#
#   bash scripts/gpu_check.sh OUT                                      # a GPU machine: its python3, no venv
#   PYTHON=.venv/bin/python bash scripts/gpu_check.sh OUT --cpu        # every part on this CPU, small sizes
#
# Writes OUT/report.md (PASS / FAIL / SKIP per part, figures, error tails), OUT/gpu_check.log (every command and
# its output), OUT/kernel_tests.xml, OUT/step.csv and OUT/kernels.csv.
# Exit status: 0 when no part failed, 1 when one did, 2 on bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/gpu_check.sh OUT [--cpu [--quick]] [--budget S] [--parts ...] [--wheels DIR]" >&2
  exit 2
fi
# the checkout itself, not an installed copy: amd_fast.ops provides amd_fast.kernels from kernels/
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
