#!/usr/bin/env bash
# The TD3 critic comparison of docs/hypernetworks.md: MLP-Standard vs SA-Hyper with the paper's
# initialisation (heads calibrated on the warm-up states) vs SA-Hyper with the authors' fixed head
# bounds, on Hopper-v4 with the td3-hyper-mujoco settings (batch 100, 1k random steps, hyper critic
# lr 5e-5), a 32-64-128 primary (CPU), 12k steps, evaluation and gradient accuracy every 3k steps.
# One run per command, seeds interleaved; finished runs are skipped. Then:
#   .venv/bin/python docs/results/hyper/plot_hyper.py collect ROOT docs/results/hyper
#   .venv/bin/python docs/results/hyper/plot_hyper.py report docs/results/hyper
# Usage: docs/results/hyper/run_td3_critics.sh ROOT [SEEDS...]   (WRAP="/path/to/wrapper" to run each through a command of yours, e.g. a CPU-slot limiter)
set -eu
ROOT=${1:?run root}; shift
SEEDS=${*:-1 2 3 4 5}
export OMP_NUM_THREADS=1
SMALL='params.critic_options={"primary_widths":[32,64,128]}'
for seed in $SEEDS; do
  for arm in mlp sa_hyper sa_hyper_authors; do
    run="$ROOT/$arm-s$seed"
    if [ -f "$run/summary.json" ] && grep -q '"finished"' "$run/summary.json"; then continue; fi
    case $arm in
      mlp) extra=(--set params.critic=mlp) ;;
      sa_hyper) extra=(--set params.critic=sa_hyper --set "$SMALL") ;;
      sa_hyper_authors) extra=(--set params.critic=sa_hyper --set "$SMALL" --set params.hyper_init=authors) ;;
    esac
    ${WRAP:-} .venv/bin/aclab train td3-hyper --env mujoco:Hopper-v4 --total-steps 12000 --seed "$seed" \
      --run-dir "$run" --overwrite --quiet --set device=cpu "${extra[@]}" \
      --set params.grad_accuracy_every=3000 --set params.grad_accuracy_horizon=200 \
      --set eval.every_steps=3000 --set eval.episodes=5
  done
done
