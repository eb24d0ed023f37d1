#!/usr/bin/env bash
# test_unit.sh SRC BINDIR: the shipped unit passes `systemd-analyze verify`
# (with ExecStart pointing at the freshly built daemon) and its offline
# security exposure stays at or below the documented score.
set -euo pipefail
src=$1 bindir=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#@BINDIR@#$bindir#g" "$src/deploy/lightmoed.service.in" > "$tmp/lightmoed.service"
systemd-analyze verify --man=no "$tmp/lightmoed.service"
out=$(systemd-analyze security --offline=true "$tmp/lightmoed.service" 2>&1 | tail -1)
echo "$out"
score=$(echo "$out" | sed -n 's/.*exposure level for lightmoed.service: \([0-9.]*\).*/\1/p')
[ -n "$score" ] || { echo "could not read the exposure score"; exit 1; }
# docs/OPERATIONS.md records 1.8; fail if a change weakens the hardening.
awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || { echo "exposure $score > 2.0"; exit 1; }
echo "unit ok, exposure $score"
