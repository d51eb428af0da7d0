#!/bin/sh
# Installs Debian's chromium (and a basic font set) for the browser tests, when it is missing.
# Never downloads a browser build: the distribution's package only (no `playwright install`).
# Needs root (CI containers run as root); exits 0 at once when /usr/bin/chromium is there.
set -eu

CHROMIUM=${STAGECAST_CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "install_chromium.sh: $CHROMIUM is missing and this is not root;" \
         "run: sudo apt-get update && sudo apt-get install -y chromium fonts-liberation" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium.sh: $CHROMIUM is missing and apt-get is not available" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
timeout 600 apt-get update -q
timeout 900 apt-get install -y -q --no-install-recommends chromium fonts-liberation
test -x "$CHROMIUM"
