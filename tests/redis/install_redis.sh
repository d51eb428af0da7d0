#!/bin/sh
# Installs Debian's redis-server for the Redis tests (the event log on Redis Streams, the run
# queue, several processes), when it is missing. The distribution's package only; the tests
# start their own server on 127.0.0.1 at a free port (never the system service's 6379).
# Needs root (CI containers run as root); exits 0 at once when redis-server is there.
set -eu

REDIS=${STAGECAST_REDIS_SERVER:-redis-server}
if command -v "$REDIS" >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "install_redis.sh: $REDIS is missing and this is not root;" \
         "run: sudo apt-get update && sudo apt-get install -y redis-server" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_redis.sh: $REDIS is missing and apt-get is not available" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101: the package must not start the system service (the tests start their own)
policy=/usr/sbin/policy-rc.d
made_policy=
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
fi
status=0
timeout 600 apt-get update -q || status=$?
if [ "$status" = 0 ]; then
    timeout 900 apt-get install -y -q --no-install-recommends redis-server || status=$?
fi
if [ -n "$made_policy" ]; then
    rm -f "$policy"
fi
[ "$status" = 0 ] || exit "$status"
command -v "$REDIS" >/dev/null 2>&1
