#!/usr/bin/env bash
# Make sure a headless-capable Chromium is available for the book's browser test.
# Idempotent and quiet. Never fails the calling target: if Chromium cannot be
# installed it says so in one sentence and exits 0 (tests/test_book.py then
# fails loudly with the same hint instead of skipping).
set -u

for b in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$b" >/dev/null 2>&1; then
    exit 0
  fi
done
if [ -n "${CHROMIUM:-}" ] && [ -x "${CHROMIUM}" ]; then
  exit 0
fi

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "ensure_chromium: installing the Debian 'chromium' package (headless browser for the book test)..."
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq >/dev/null 2>&1 \
     && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1; then
    command -v chromium >/dev/null 2>&1 && exit 0
  fi
fi

echo "ensure_chromium: could not find or install Chromium; install it (e.g. 'sudo apt-get install chromium') or set CHROMIUM=/path/to/chrome, otherwise the book's browser test will fail."
exit 0
