#!/usr/bin/env bash
# The tests' one system package: install redis-server where this user can (root or sudo, with apt-get),
# otherwise say how and fail (the Redis tests fail without it; ORTHRUS_ALLOW_NO_REDIS=1 lets them skip).
set -euo pipefail
command -v redis-server >/dev/null 2>&1 && exit 0
[ "${ORTHRUS_ALLOW_NO_REDIS:-}" = 1 ] && { echo "redis-server missing: the Redis tests will skip"; exit 0; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server && exit 0
fi
echo "make test needs redis-server: install it (Debian: apt-get install -y redis-server)," \
     "or set ORTHRUS_ALLOW_NO_REDIS=1 to skip the Redis tests" >&2
exit 1
