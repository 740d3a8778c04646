#!/usr/bin/env bash
# A real browser for tests/test_console.py: Debian's chromium at /usr/bin/chromium (Playwright from
# pip drives it; `playwright install` is not used). Idempotent and quiet: does nothing when
# /usr/bin/chromium exists, or when apt-get is missing or this is not root (the test then skips,
# or fails under CI=true).
set -euo pipefail
if [[ -x /usr/bin/chromium ]]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [[ $(id -u) -ne 0 ]]; then
  echo "install_browser.sh: /usr/bin/chromium is missing; install Debian's chromium package (as root)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-liberation; } >"$log" 2>&1; then
  tail -20 "$log" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
