#!/usr/bin/env bash
# One-time set-up on a fresh machine: .venv with the pinned CPU build of torch and aclab's
# dependencies from constraints.txt, plus the Qt 5 runtime that EnvPool's Procgen needs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if ! ldconfig -p 2>/dev/null | grep -q 'libQt5Gui.so.5'; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's libqt5gui5 (Qt 5 runtime for EnvPool's Procgen)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libqt5gui5 >/dev/null
  else
    echo "setup: warning: libQt5Gui.so.5 not found and cannot apt-get install it; Procgen envs will fail" >&2
  fi
fi

# MuJoCo videos (aclab eval --video) render off-screen through EGL (Mesa's software renderer on CPUs).
if ! ldconfig -p 2>/dev/null | grep -q 'libEGL_mesa.so.0'; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's libegl1 libegl-mesa0 libgl1-mesa-dri (off-screen MuJoCo rendering)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libegl-mesa0 libgl1-mesa-dri >/dev/null
  else
    echo "setup: warning: Mesa's EGL not found and cannot apt-get install it; MuJoCo videos will fail" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned: the CPU build lies on this machine's disk; an unpinned torch would pull a CUDA build.
$PIP install "$(grep -E '^torch==' constraints.txt)"
$PIP install -c constraints.txt -e ".[dev,mujoco,ray,tune,wandb,docs,mutation]"
touch "$VENV/.aclab-installed"
echo "setup: done ($VENV)"
