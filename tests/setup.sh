#!/bin/sh
# The test suite's own setup: what `pytest` needs besides the Python packages of the `test`
# extra. It is part of the README's test command (and so of .ci/run); pytest itself never
# installs anything: Debian's Chromium for the demo-page tests, the npm SSE clients of the
# foreign-client conformance test (tests/conformance), Debian's redis-server for the shared
# event log's tests (each test session starts its own on 127.0.0.1 at a free port), and the
# TypeScript tools that generate and type-check api/static/stagecast.d.ts (tests/typescript).
#
# Outside CI, what cannot be installed (no root, no apt-get) is reported and the tests that need
# it skip, saying why; with CI=true it is an error here and a failure in the suite.
set -eu
cd "$(dirname "$0")"

status=0

# step WHAT COMMAND...: run one installer; outside CI a failure only says which tests will skip
step() {
    what=$1
    shift
    if ! "$@"; then
        if [ "${CI:-}" = "true" ]; then
            status=1
        else
            echo "tests/setup.sh: no $what will skip" >&2
        fi
    fi
}

step "Chromium: the browser tests (tests/browser)" sh browser/install_chromium.sh
step "npm clients: the conformance tests (tests/conformance)" sh npm_ci.sh conformance
step "redis-server: the Redis tests" sh redis/install_redis.sh
step "TypeScript tools: the tests/typescript tests" sh npm_ci.sh typescript
exit "$status"
