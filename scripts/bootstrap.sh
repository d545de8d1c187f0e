#!/usr/bin/env bash
# Idempotent set-up shared by the README commands: finds (or clones) ComfyUI and makes the
# virtual environment (torch 2.14.1 + ComfyUI's requirements + ours) and Debian's chromium for the
# browser test. Source it:
#   . scripts/bootstrap.sh    -> exports COMFYUI_PATH and PERSONALIZE_PYTHON
set -euo pipefail

PERSONALIZE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PERSONALIZE_CACHE="${PERSONALIZE_CACHE:-$HOME/.cache/comfyui-personalize}"
PERSONALIZE_VENV="${PERSONALIZE_VENV:-$PERSONALIZE_CACHE/venv}"
COMFYUI_PIN="v0.3.64"
COMFYUI_REPO_URL="https://github.com/comfyanonymous/ComfyUI.git"

die() { echo "error: $*" >&2; exit 1; }
is_comfyui() { [ -f "$1/main.py" ] && [ -d "$1/comfy" ] && [ -f "$1/nodes.py" ]; }

# 1. ComfyUI: COMFYUI_PATH, else the ComfyUI whose custom_nodes/ holds this checkout,
#    else the cache, else a pinned clone into the cache.
if [ -n "${COMFYUI_PATH:-}" ]; then
  is_comfyui "$COMFYUI_PATH" || die "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no main.py, comfy/, nodes.py). Point COMFYUI_PATH at ComfyUI $COMFYUI_PIN or unset it."
elif [ "$(basename "$(dirname "$PERSONALIZE_ROOT")")" = "custom_nodes" ] && is_comfyui "$(dirname "$(dirname "$PERSONALIZE_ROOT")")"; then
  COMFYUI_PATH="$(dirname "$(dirname "$PERSONALIZE_ROOT")")"
elif is_comfyui "$PERSONALIZE_CACHE/ComfyUI"; then
  COMFYUI_PATH="$PERSONALIZE_CACHE/ComfyUI"
else
  echo "ComfyUI not found: cloning $COMFYUI_PIN into $PERSONALIZE_CACHE/ComfyUI" >&2
  mkdir -p "$PERSONALIZE_CACHE"
  rm -rf "$PERSONALIZE_CACHE/ComfyUI.partial"
  git clone -q --depth 1 --branch "$COMFYUI_PIN" "$COMFYUI_REPO_URL" "$PERSONALIZE_CACHE/ComfyUI.partial" \
    || die "could not clone ComfyUI $COMFYUI_PIN. Set COMFYUI_PATH to a ComfyUI $COMFYUI_PIN checkout."
  mv "$PERSONALIZE_CACHE/ComfyUI.partial" "$PERSONALIZE_CACHE/ComfyUI"
  COMFYUI_PATH="$PERSONALIZE_CACHE/ComfyUI"
fi
export COMFYUI_PATH

# 2. The virtual environment, rebuilt only when a requirements file changes.
PY_BOOT="$(command -v python3.11 || command -v python3)"
[ -x "$PERSONALIZE_VENV/bin/python" ] || "$PY_BOOT" -m venv "$PERSONALIZE_VENV"
stamp_file="$PERSONALIZE_VENV/.personalize-stamp"
stamp="$(cat "$COMFYUI_PATH/requirements.txt" "$PERSONALIZE_ROOT/requirements.txt" "$PERSONALIZE_ROOT/requirements-dev.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
  echo "setting up $PERSONALIZE_VENV (torch 2.14.1, ComfyUI and pack requirements)..." >&2
  pip=("$PERSONALIZE_VENV/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" torch==2.14.1 torchvision==0.29.1
  # ComfyUI owns torch: its requirements go in without torch/torchvision/torchaudio so that
  # nothing replaces the pinned build.
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=~!].*)?$' "$COMFYUI_PATH/requirements.txt" > "$PERSONALIZE_VENV/comfyui-requirements.txt"
  "${pip[@]}" -r "$PERSONALIZE_VENV/comfyui-requirements.txt" -r "$PERSONALIZE_ROOT/requirements.txt" \
    -r "$PERSONALIZE_ROOT/requirements-dev.txt" torch==2.14.1 torchvision==0.29.1
  echo "$stamp" > "$stamp_file"
fi
export PERSONALIZE_PYTHON="$PERSONALIZE_VENV/bin/python"

# 3. The browser of the UI test (tests/test_web_ui.py): Debian's chromium, which Playwright drives
#    through executable_path (it never downloads a browser of its own).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the browser test..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
      || die "could not install chromium (apt-get install chromium); the browser test needs /usr/bin/chromium."
  else
    echo "warning: /usr/bin/chromium is missing (apt-get install chromium as root); tests/test_web_ui.py will skip outside CI." >&2
  fi
fi
export PERSONALIZE_ROOT PERSONALIZE_CACHE
