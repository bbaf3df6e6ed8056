#!/usr/bin/env bash
# One-time set-up, called by every make target that needs it: Java 17 check, .venv with pinned packages.
# Idempotent: finishes by touching .venv/.installed, which make uses as the up-to-date marker.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
if ! command -v java >/dev/null 2>&1 || ! java -version 2>&1 | grep -qE 'version "(17|21)'; then
  need_apt+=(openjdk-17-jre-headless)
fi
# headless Chromium renders report.html in the report test (Debian's package; no browser download)
if ! command -v chromium >/dev/null 2>&1; then need_apt+=(chromium); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo ">> installing ${need_apt[*]} with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    for p in "${need_apt[@]}"; do
      case $p in
        openjdk*) echo "ERROR: Spark needs Java 17. Install it (Debian: sudo apt-get install openjdk-17-jre-headless) and rerun." >&2; exit 1;;
        chromium) echo "WARNING: chromium not found; the report screenshot test will be skipped (Debian: apt-get install chromium)." >&2;;
      esac
    done
  fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo ">> creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
echo ">> installing pinned packages (requirements.lock; ~3 min and ~7 GB the first time)"
.venv/bin/pip install -q -r requirements.lock
# PP-OCRv4 ONNX models for the ppocr text-spot engine; --no-deps: its opencv-python requirement would replace
# opencv-python-headless's cv2 (its other dependencies are pinned in requirements.lock)
.venv/bin/pip install -q --no-deps rapidocr-onnxruntime==1.4.4
.venv/bin/pip install -q --no-deps -e .
touch .venv/.installed
echo ">> environment ready"
