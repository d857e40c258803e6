#!/usr/bin/env bash
# Build the Debian package edge-agent_<version>_<arch>.deb from the wheel, with dpkg-deb.
#
#   packaging/deb/build.sh [OUT_DIR]        (make deb: OUT_DIR=dist)
#
# Layout of the package:
#   /opt/edge-agent/                 a venv on Debian's /usr/bin/python3.11 with the wheel and
#                                    its dependencies (byte-compiled for /opt/edge-agent)
#   /usr/bin/edge-agent              -> /opt/edge-agent/bin/edge-agent
#   /lib/systemd/system/edge-agent.service   systemd/edge-agent.service, with DynamicUser=
#                                    off (the package creates a static user, so the data
#                                    directory keeps one owner across upgrades)
#   /etc/edge-agent/config.yaml      conffile (config/example.yaml): dpkg keeps local edits
#   postinst: system user edge-agent, /var/lib/edge-agent (0700), then `edge-agent validate`;
#             restarts (upgrade: try-restart) only when the configuration is valid.
#
# Needs: dpkg-deb, Debian's python3.11 (the venv's interpreter on the target), a Python with
# pip >= 22.3 to build the wheel and install into the venv (BUILD_PYTHON, default python3),
# and PyPI for the dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."
# A PYTHONPATH with this tree (the tests set one) would make pip skip the wheel as installed.
unset PYTHONPATH PYTHONHOME
OUT=$(realpath -m "${1:-dist}")
TARGET_PY=/usr/bin/python3.11
BUILD_PY=${BUILD_PYTHON:-python3}
[ -x "$TARGET_PY" ] || { echo "deb: $TARGET_PY missing (apt-get install python3.11)" >&2; exit 2; }
command -v dpkg-deb >/dev/null || { echo "deb: dpkg-deb missing" >&2; exit 2; }

VERSION=$("$TARGET_PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
VENV=$ROOT/opt/edge-agent
mkdir -p "$OUT"

"$BUILD_PY" -m pip wheel --quiet --no-deps --wheel-dir "$WORK/wheel" .
"$TARGET_PY" -m venv --without-pip "$VENV"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$BUILD_PY" -m pip --python "$VENV/bin/python" install \
    --quiet --no-compile "$WORK"/wheel/plant_edge_agent-*.whl

# The venv was made under $VENV; on the box it lives at /opt/edge-agent.
grep -rlI --null "$VENV" "$VENV/bin" "$VENV/pyvenv.cfg" | xargs -0 -r sed -i "s|$VENV|/opt/edge-agent|g"
# Bytecode with the installed paths (the unit sets PYTHONDONTWRITEBYTECODE: no writes at run).
"$TARGET_PY" -m compileall -q -j 0 -s "$ROOT" -p / "$VENV/lib" >/dev/null
# What a box never needs from the venv: the dependencies' test suites, debug symbols.
find "$VENV/lib" -depth -type d \( -name tests -o -name test \) -path '*/site-packages/*' \
    -exec rm -rf {} +
if command -v strip >/dev/null; then
    find "$VENV/lib" -name '*.so' -exec strip --strip-unneeded {} +
fi

install -d "$ROOT/usr/bin" "$ROOT/lib/systemd/system" "$ROOT/etc/edge-agent" \
    "$ROOT/usr/share/doc/edge-agent" "$ROOT/DEBIAN"
ln -s /opt/edge-agent/bin/edge-agent "$ROOT/usr/bin/edge-agent"
sed 's/^DynamicUser=yes$/# DynamicUser= is off: the package made the static user edge-agent./' \
    systemd/edge-agent.service > "$ROOT/lib/systemd/system/edge-agent.service"
install -m 0644 config/example.yaml "$ROOT/etc/edge-agent/config.yaml"
install -m 0644 systemd/edge-agent.env.example "$ROOT/usr/share/doc/edge-agent/edge-agent.env.example"
install -m 0644 README.md "$ROOT/usr/share/doc/edge-agent/README.md"
printf 'plant-edge-agent\nLicense: Apache-2.0 (/usr/share/common-licenses/Apache-2.0)\n' \
    > "$ROOT/usr/share/doc/edge-agent/copyright"

echo /etc/edge-agent/config.yaml > "$ROOT/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/deb/$script" "$ROOT/DEBIAN/$script"
done
cat > "$ROOT/DEBIAN/control" <<CONTROL
Package: edge-agent
Version: $VERSION
Architecture: $ARCH
Maintainer: plant-edge-agent maintainers <edge-agent@localhost>
Installed-Size: $(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
Depends: python3.11, passwd, procps
Section: net
Priority: optional
Homepage: https://localhost/plant-edge-agent
Description: plant edge gateway: PLC signals in, downtime and scrap events out
 Reads PLCs (OPC UA, Modbus TCP, MQTT/Sparkplug B), detects downtime and scrap events
 locally, buffers them durably in SQLite and delivers them idempotently to central APIs.
CONTROL

DEB="$OUT/edge-agent_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz -z6 --build "$ROOT" "$DEB" >/dev/null
echo "$DEB"
