#!/bin/sh
# `npm ci` in one folder of tests/ (its package-lock.json pins the versions): the foreign SSE
# clients of tests/conformance, the TypeScript tools of tests/typescript. Node.js and npm come
# from Debian's packages when they are missing and this is root; never a downloaded toolchain.
#     sh tests/npm_ci.sh conformance
set -eu
cd "$(dirname "$0")/$1"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "npm_ci.sh $1: node and npm are missing;" \
             "run: sudo apt-get update && sudo apt-get install -y nodejs npm" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -q
    timeout 900 apt-get install -y -q --no-install-recommends nodejs npm
fi
timeout 600 npm ci --no-audit --no-fund --loglevel=error
