#!/usr/bin/env bash
# Install only `promtool` (for `promtool check/test rules`) from Debian's `prometheus` package,
# without installing the package: `apt-get install prometheus` would also start a Prometheus server
# through its init script and pull in a dozen JavaScript packages. Idempotent; run as root.
set -euo pipefail
if command -v promtool >/dev/null; then
    exit 0
fi
dest=/opt/prometheus-deb
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
chown _apt "$tmp" 2>/dev/null || true  # apt downloads as its sandbox user _apt
apt-get update -qq || true
(cd "$tmp" && apt-get download -qq prometheus)
dpkg-deb -x "$tmp"/prometheus_*.deb "$dest"
ln -sf "$dest/usr/bin/promtool" /usr/local/bin/promtool
/usr/local/bin/promtool --version | head -1
