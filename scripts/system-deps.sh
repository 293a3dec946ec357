#!/usr/bin/env bash
# Debian packages the end-to-end tests use: Chromium (playground test, driven by Playwright's
# Python client with executable_path), promtool (metrics format check), redis-server (Redis store).
# Installed once; a machine that has them skips this in a second.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "system-deps: missing ${need[*]} and not root; the tests that need them will be skipped" >&2
  exit 0
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
