#!/bin/sh
# Installs the TypeScript tools of tests/typescript (json-schema-to-typescript, typescript;
# versions pinned by package-lock.json) with `npm ci`. Node.js and npm come from Debian's
# packages when they are missing and this is root; never a downloaded toolchain.
set -eu
cd "$(dirname "$0")"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "typescript/install.sh: node and npm are missing;" \
             "run: sudo apt-get update && sudo apt-get install -y nodejs npm" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -q
    timeout 900 apt-get install -y -q --no-install-recommends nodejs npm
fi
timeout 600 npm ci --no-audit --no-fund --loglevel=error
