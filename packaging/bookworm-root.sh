#!/usr/bin/env bash
# A fresh Debian bookworm root file system made with debootstrap from the machine's own Debian
# mirror (the first .../debian URI apt is configured with), for the package and image
# tests: no registry image needed.
#
#   packaging/bookworm-root.sh DIR [PACKAGE,...]     (extra packages, comma-separated)
#
# Trimmed afterwards (apt lists and caches, docs, man pages, locales): the image's base.
set -euo pipefail
DIR=$1
INCLUDE=${2:-}
command -v debootstrap >/dev/null || { echo "debootstrap missing (apt-get install debootstrap)" >&2; exit 2; }
MIRROR=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -E '^(URIs:|deb )' \
    | grep -oE 'https?://[^ ]+' | grep -E '/debian/?$' | head -1 || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
rm -rf "$DIR"
debootstrap --variant=minbase ${INCLUDE:+--include="$INCLUDE"} bookworm "$DIR" "$MIRROR" >"$DIR.log" 2>&1 \
    || { tail -20 "$DIR.log" >&2; exit 1; }
rm -rf "$DIR"/var/cache/apt/archives/*.deb "$DIR"/var/cache/apt/*.bin "$DIR"/var/lib/apt/lists/* \
    "$DIR"/usr/share/doc/* "$DIR"/usr/share/man/* "$DIR"/usr/share/info/* \
    "$DIR"/var/log/*.log "$DIR"/var/cache/debconf/*-old
find "$DIR/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'C.*' ! -name locale.alias -exec rm -rf {} +
