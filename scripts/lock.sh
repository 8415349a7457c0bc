#!/usr/bin/env bash
# Regenerate requirements/lock.txt from requirements/requirements.in with uv.
# uv does not read pip's configuration, so the indexes and wheel folders pip is
# configured with on this machine are handed to it at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
uvenv=${UV_VENV:-/tmp/peflow-uv}
[ -x "$uvenv/bin/uv" ] || { "$py" -m venv "$uvenv" && "$uvenv/bin/pip" install -q uv; }
args=()
while IFS= read -r line; do
  key=${line%%=*}; val=${line#*=}; val=${val//\'/}
  case "$key" in
    *.find-links) for v in $val; do args+=(--find-links "$v"); done ;;
    *.extra-index-url) for v in $val; do args+=(--extra-index-url "$v"); done ;;
    *.index-url) args+=(--index-url "$val") ;;
  esac
done < <("$py" -m pip config list 2>/dev/null)
UV_CACHE_DIR=${UV_CACHE_DIR:-/tmp/peflow-uv-cache} "$uvenv/bin/uv" pip compile \
  requirements/requirements.in --python-version 3.11 --index-strategy unsafe-best-match \
  --no-header "${args[@]}" -o requirements/lock.txt
echo "wrote requirements/lock.txt"
