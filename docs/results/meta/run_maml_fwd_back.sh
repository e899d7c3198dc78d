#!/usr/bin/env bash
# The MAML comparison of docs/meta_rl.md: Vanilla vs Context vs Hyper MAML on HalfCheetah-Fwd-Back with
# the corrected task settings (direction context d in {-1, +1}, 20-d observation, Hyper-MAML heads
# calibrated on the training contexts): maml-halfcheetah-fwd-back-cpu for 20 meta-iterations (320k env
# steps), evaluation every 5; then the gradient-noise experiment (hypernetwork paper, Figure 5) on every
# Context-MAML and Hyper-MAML run's final checkpoint: 8 independent meta-updates, 2 evaluation episodes
# per test task. One run per command, seeds interleaved; finished runs are skipped. Then:
#   .venv/bin/python docs/results/meta/compare_ci.py collect ROOT docs/results/meta
#   .venv/bin/python docs/results/meta/compare_ci.py report docs/results/meta
# Usage: docs/results/meta/run_maml_fwd_back.sh ROOT [SEEDS...]   (WRAP="/path/to/wrapper" to run each through a command of yours, e.g. a CPU-slot limiter)
set -eu
ROOT=${1:?run root}; shift
SEEDS=${*:-1 2 3 4 5}
export OMP_NUM_THREADS=1
for seed in $SEEDS; do
  for algo in maml-context maml-hyper maml; do
    run="$ROOT/$algo-s$seed"
    if [ -f "$run/summary.json" ] && grep -q '"finished"' "$run/summary.json"; then continue; fi
    ${WRAP:-} .venv/bin/aclab train "$algo" --preset maml-halfcheetah-fwd-back-cpu --total-steps 320000 \
      --seed "$seed" --run-dir "$run" --overwrite --quiet --set device=cpu --set params.eval_every=5
  done
done
for seed in $SEEDS; do
  for algo in maml-context maml-hyper; do
    out="$ROOT/noise-$algo-s$seed.json"
    [ -f "$out" ] && continue
    ${WRAP:-} .venv/bin/aclab analyze gradient-noise "$ROOT/$algo-s$seed" --updates 8 --episodes 2 \
      --device cpu --out "$out"
  done
done
