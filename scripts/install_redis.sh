#!/usr/bin/env bash
# The tests start a real redis-server (Debian package redis-server) for the Redis cache layer.
set -euo pipefail
command -v redis-server >/dev/null && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q redis-server || { $sudo apt-get update -q && $sudo apt-get install -y -q redis-server; }
