#!/usr/bin/env bash
# test-package.sh BUILD_DIR: build the .deb (and .rpm where rpmbuild exists),
# run lintian on the .deb, install it with dpkg (no systemd needed), run
# `lightmoed --check-config` from the installed files, remove it (config and
# state kept), purge it (both gone). Needs root; changes the system, so
# tools/test.sh runs it only in CI (CI=true) or when asked (--package).
set -euo pipefail
build=${1:-build}
[ "$(id -u)" = 0 ] || { echo "test-package: needs root"; exit 1; }
(cd "$build" && cpack -G DEB >/dev/null)
deb=$(ls -t "$build"/lightmoe_*.deb | head -1)
echo "== package: $deb"
dpkg-deb --info "$deb" | sed -n '1,20p'
if command -v rpmbuild >/dev/null; then
  (cd "$build" && cpack -G RPM >/dev/null) && ls "$build"/lightmoe-*.rpm
fi
if command -v lintian >/dev/null; then
  echo "== lintian (each remaining tag is explained in docs/OPERATIONS.md)"
  lintian --tag-display-limit 0 "$deb" 2>&1 | grep -v "root privileges" || true
fi

fail() { echo "test-package: FAIL: $*"; dpkg -P lightmoe >/dev/null 2>&1; exit 1; }
dpkg -r lightmoe >/dev/null 2>&1 || true
dpkg -i "$deb"
command -v lightmoed >/dev/null || fail "lightmoed not on PATH after install"
[ -f /etc/lightmoe/lightmoed.conf ] || fail "conffile missing"
getent passwd lightmoe >/dev/null || fail "system user not created"
lightmoed --help >/dev/null || fail "lightmoed --help"
# Fresh install: no model yet, so the config check (the unit's ExecStartPre)
# refuses with a message that names the model key.
rm -rf /var/lib/lightmoe/model
if lightmoed --check-config --config /etc/lightmoe/lightmoed.conf 2>/tmp/lightmoe-nomodel.err; then
  fail "--check-config passed with no model installed"
fi
grep -q 'model' /tmp/lightmoe-nomodel.err || fail "no-model error does not name the key"
rm -f /tmp/lightmoe-nomodel.err
# With a model where the shipped config points, the check passes.
lightmoe synth --arch qwen2_moe --preset tiny /var/lib/lightmoe/model >/dev/null
lightmoed --check-config --config /etc/lightmoe/lightmoed.conf >/dev/null || fail "--check-config on the shipped config"
# A bad config must be refused with the line named.
printf 'no_such_key = 1\n' > /tmp/lightmoe-bad.conf
if lightmoed --check-config --config /tmp/lightmoe-bad.conf 2>/tmp/lightmoe-bad.err; then
  fail "--check-config accepted an unknown key"
fi
grep -q 'lightmoe-bad.conf:1:' /tmp/lightmoe-bad.err || fail "error does not name the line: $(cat /tmp/lightmoe-bad.err)"
rm -f /tmp/lightmoe-bad.conf /tmp/lightmoe-bad.err
echo "# operator edit" >> /etc/lightmoe/lightmoed.conf
dpkg -r lightmoe
[ ! -e /usr/bin/lightmoed ] || fail "binary left after remove"
grep -q "operator edit" /etc/lightmoe/lightmoed.conf || fail "remove dropped the edited conffile"
[ -f /var/lib/lightmoe/model/config.json ] || fail "remove dropped the state directory"
dpkg -P lightmoe
[ ! -e /etc/lightmoe/lightmoed.conf ] || fail "purge left the conffile"
[ ! -e /var/lib/lightmoe ] || fail "purge left the state directory"
echo "test-package: install, check-config, remove, purge: ok"
