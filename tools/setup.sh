#!/usr/bin/env bash
# Builds (once) and prints the path of the virtual environment for this checkout.
# The venv lives outside the clone under a key that hashes the pinned dependency spec, so a fresh
# clone reuses it when the spec is unchanged and builds it from nothing when it is absent.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
spec="$here/tools/requirements.lock"
key="$(cat "$spec" | sha256sum | cut -c1-16)"
root="${EDGEKD_VENV_ROOT:-$HOME/.cache/edgekd/venvs}"
venv="$root/$key"
if [ ! -f "$venv/.complete" ]; then
  echo "edgekd setup: building $venv (first time for this dependency spec)" >&2
  rm -rf "$venv"
  mkdir -p "$root"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  "$venv/bin/pip" install --quiet -r "$spec" >&2
  touch "$venv/.complete"
fi
"$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$here" >&2 2>/dev/null \
  || "$venv/bin/pip" install --quiet --no-deps -e "$here" >&2
echo "$venv"
