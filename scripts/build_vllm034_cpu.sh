#!/usr/bin/env bash
# Build vLLM 0.34.0's CPU wheel from its PyPI sdist, as ../shared/vllm-cpu/README.md describes (x86-64,
# AVX2 kernels only, the standalone no-Triton CPU runner, the project's torch), where no such wheel is at
# hand. scripts/setup.sh calls it when ../shared/vllm-cpu has no wheel; about 75 minutes on 2 cores,
# almost all of it oneDNN. Idempotent: a wheel already built in OUT is reused.
#
#   scripts/build_vllm034_cpu.sh [OUT]      # default OUT: .cache/vllm034; prints the wheel's path last
#
# Environment: ONEDNN_SOURCE, a oneDNN v3.13 source tarball (default ../shared/vllm-cpu/onednn-v3.13.tar.gz
# when present; otherwise vLLM's CMake fetches oneDNN from GitHub, so GitHub must be reachable); PYTHON.
# The local patch (scripts/vllm034/vllm-0.34.0-cpu-local.patch) lowers the g++ check to 12.2 and lets x86
# without Triton run vLLM's standalone CPU runner, whose kernels it compiles into _C_AVX2.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=$(realpath -m "${1:-.cache/vllm034}")
PYTHON=${PYTHON:-python3.11}
SDIST=vllm-0.34.0.tar.gz
SDIST_SHA256=fcad848b246a9d8652b47e6425af92334dc02492f9802720f54e27b823cf0113
PATCH=$PWD/scripts/vllm034/vllm-0.34.0-cpu-local.patch
TORCH=$(grep '^torch==' requirements/cpu.lock)
ONEDNN_SOURCE=${ONEDNN_SOURCE:-../shared/vllm-cpu/onednn-v3.13.tar.gz}

built=$(ls "$OUT"/dist/vllm-0.34.0*.whl 2>/dev/null | head -1 || true)
if [[ -n "$built" ]]; then
    echo "$built"
    exit 0
fi
mkdir -p "$OUT"
onednn_env=()
if [[ -f "$ONEDNN_SOURCE" ]]; then
    # The tarball's one top-level folder (onednn-v3.13/) is dropped: CMake wants the folder that holds
    # oneDNN's CMakeLists.txt, and without it builds vLLM's dnnl_ext with no oneDNN include path.
    rm -rf "$OUT/onednn" && mkdir "$OUT/onednn" && tar xzf "$ONEDNN_SOURCE" -C "$OUT/onednn" --strip-components=1
    [[ -f "$OUT/onednn/CMakeLists.txt" ]] || { echo "build_vllm034_cpu: $ONEDNN_SOURCE is not a oneDNN source tree" >&2; exit 1; }
    onednn_env=(FETCHCONTENT_SOURCE_DIR_ONEDNN="$OUT/onednn")
elif ! timeout 15 curl -fsI https://github.com >/dev/null 2>&1; then
    echo "build_vllm034_cpu: no oneDNN source ($ONEDNN_SOURCE) and GitHub is unreachable, so vLLM's CMake" \
         "cannot fetch it: not building" >&2
    exit 1
fi
# libnuma's headers to compile; tcmalloc, which vLLM's setup.py bundles into the wheel when the loader knows
# one (`ldconfig -p`, as setup.py asks; the CPU worker preloads it).
if [[ ! -f /usr/include/numa.h ]] || ! ldconfig -p | grep 'libtcmalloc\(_minimal\)\?\.so\.' >/dev/null; then
    command -v apt-get >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnuma-dev \
        libtcmalloc-minimal4 >/dev/null
fi

# The sdist from the package index (pip download would run its metadata step, which imports torch).
"$PYTHON" - "$OUT/$SDIST" "$SDIST_SHA256" <<'PY'
import hashlib, json, sys, urllib.request
path, sha = sys.argv[1:3]
try:
    data = open(path, "rb").read()
except FileNotFoundError:
    data = b""
if hashlib.sha256(data).hexdigest() != sha:
    index = urllib.request.Request("https://pypi.org/simple/vllm/",
                                   headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    (url,) = [f["url"] for f in json.load(urllib.request.urlopen(index, timeout=60))["files"]
              if f["filename"] == path.rsplit("/", 1)[1]]
    data = urllib.request.urlopen(url, timeout=600).read()
    if hashlib.sha256(data).hexdigest() != sha:
        sys.exit(f"{url}: sha256 differs from the pinned {sha}")
    open(path, "wb").write(data)
PY
rm -rf "$OUT/vllm-0.34.0" && tar xzf "$OUT/$SDIST" -C "$OUT"
patch -s -d "$OUT/vllm-0.34.0" -p1 < "$PATCH"
[[ -x "$OUT/venv/bin/pip" ]] || "$PYTHON" -m venv "$OUT/venv"
"$OUT/venv/bin/pip" install --quiet "cmake>=3.26.1" ninja "packaging>=24.2" setuptools==78.1.1 "setuptools-scm>=8" \
    "setuptools-rust>=1.9.0" wheel "jinja2>=3.1.6" regex "$TORCH"
# Without cargo on PATH the optional Rust front-end is skipped.
path_without_cargo=$OUT/venv/bin:$(tr ':' '\n' <<<"$PATH" | grep -v cargo | paste -sd:)
(cd "$OUT/vllm-0.34.0" && env PATH="$path_without_cargo" "${onednn_env[@]}" VLLM_TARGET_DEVICE=cpu MAX_JOBS="$(nproc)" \
    CMAKE_BUILD_TYPE=Release VLLM_CPU_X86_EXTS=_C_AVX2 VLLM_CPU_X86_STANDALONE_MRV2=1 \
    "$OUT/venv/bin/pip" wheel --quiet --no-cache-dir --no-build-isolation --no-deps -w "$OUT/dist" .) >&2
ls "$OUT"/dist/vllm-0.34.0*.whl | head -1
