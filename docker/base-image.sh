#!/usr/bin/env bash
# Prints the base image for the Dockerfiles' PYTHON_IMAGE build arg: python:3.11-slim when it is here or can be
# pulled, else a local stand-in for it, built once and then reused: Debian bookworm from the mirror apt is
# configured with (debootstrap), imported into Docker, with Python 3.11, pip, venv, libpython3.11 and its
# headers as the real image has them, and the host's locally added CA certificates, so pip inside a build gets
# through an intercepting proxy. Needs root and debootstrap for the stand-in. Progress goes to stderr.
set -euo pipefail
real=python:3.11-slim
image=tessera-stand-in/python:3.11-slim
if docker image inspect "$real" >/dev/null 2>&1 || timeout 120 docker pull -q "$real" >/dev/null 2>&1; then
    echo "$real"; exit 0
fi
if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image"; exit 0
fi

# The first Debian archive apt uses here (deb822 .sources or a one-line sources.list), not a security mirror.
mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ && !/security/ {print $2; exit}')
if [ -z "$mirror" ]; then
    mirror=$(awk '/^deb / && !/security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "no registry: building the base image stand-in $image (debootstrap bookworm from $mirror)" >&2
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,libpython3.11,libpython3.11-dev,ca-certificates \
    bookworm "$root" "$mirror" >/dev/null

# The CA certificates the host added itself (update-ca-certificates reads this folder) go into the image's bundle.
if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
    cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
# What python:3.11-slim offers: `python`, and a pip that installs system-wide (no PEP 668 marker).
ln -sf python3 "$root/usr/bin/python"
ln -sf pip3 "$root/usr/bin/pip"
rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
# As Debian's own images do: no package caches or downloaded .debs left in the layers a build adds.
cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
# Keep the mirror debootstrap used, so apt-get inside builds finds the same packages.
echo "deb $mirror bookworm main" > "$root/etc/apt/sources.list"

tar -C "$root" -c . | docker import \
    --change 'ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' - "$image" >/dev/null
echo "stand-in $image: $(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec)" >&2
echo "$image"
