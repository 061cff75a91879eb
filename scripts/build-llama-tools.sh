#!/bin/sh
# Build llama.cpp's own llama-imatrix, llama-quantize and llama-perplexity once, from the llama.cpp
# source vendored in the pinned llama-cpp-python sdist, into a cache directory beside the wheel:
#
#   $WHEELHOUSE/llama-tools-<llama-cpp-python version>-<cpu level>-<flags hash>/
#       bin/llama-imatrix bin/llama-quantize bin/llama-perplexity BUILD-INFO.json
#
# A later run with the same version and flags finds the directory and does nothing. The build goes
# to a temporary directory that is renamed into place, so an interrupted build leaves no half cache.
#
# Usage: build-llama-tools.sh VERSION WHEELHOUSE PYTHON
# Env:   LLAMA_TOOLS_CPU=portable (default) | native
#          portable: x86-64-v3 on x86_64 (AVX2, FMA, F16C, BMI2: every x86 CPU since 2015, every CI
#                    runner), armv8-a on aarch64 -- the cache can move to another machine
#          native:   -march=native; fastest here, keyed by this CPU's flags, never portable
#        LLAMA_TOOLS_JOBS (default: nproc)
#        LLAMA_TOOLS_CHECK=1: only say whether they are cached (exit 0) or not (exit 3); no build
set -eu

VERSION=${1:?usage: build-llama-tools.sh VERSION WHEELHOUSE PYTHON}
WHEELHOUSE=${2:?usage: build-llama-tools.sh VERSION WHEELHOUSE PYTHON}
PYTHON=${3:?usage: build-llama-tools.sh VERSION WHEELHOUSE PYTHON}
CPU=${LLAMA_TOOLS_CPU:-portable}
JOBS=${LLAMA_TOOLS_JOBS:-$(nproc 2>/dev/null || echo 2)}
TOOLS="llama-imatrix llama-quantize llama-perplexity"
ARCH=$(uname -m)

FLAGS="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF"
FLAGS="$FLAGS -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
FLAGS="$FLAGS -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_CCACHE=OFF"
case "$CPU" in
  portable)
    FLAGS="$FLAGS -DGGML_NATIVE=OFF"
    case "$ARCH" in
      x86_64|amd64)
        LEVEL=x86-64-v3; REQUIRES="avx2 fma f16c bmi2"
        FLAGS="$FLAGS -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
        FLAGS="$FLAGS -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" ;;
      *) LEVEL="$ARCH-generic"; REQUIRES="" ;;
    esac ;;
  native)
    FLAGS="$FLAGS -DGGML_NATIVE=ON"
    LEVEL="$ARCH-native-$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -a) | sha256sum | cut -c1-8)"
    REQUIRES="" ;;
  *) echo "LLAMA_TOOLS_CPU must be portable or native, not '$CPU'" >&2; exit 2 ;;
esac

# llama.cpp's logger is a leaked singleton with a worker thread: a tool that returns from main
# can exit before its last lines (the KL summary) are written (llama.cpp issue 22142). One line
# per tool drains the log first; it is part of the cache key.
PATCH="flush-log-1"
KEY=$(printf '%s\n' "$FLAGS $PATCH" | sha256sum | cut -c1-8)
DEST="$WHEELHOUSE/llama-tools-$VERSION-$LEVEL-$KEY"

complete() {
  for t in $TOOLS; do [ -x "$1/bin/$t" ] || return 1; done
  [ -f "$1/BUILD-INFO.json" ]
}

if complete "$DEST"; then
  echo "llama.cpp tools ($VERSION, $LEVEL): cached in $DEST"
  exit 0
fi
if [ -n "${LLAMA_TOOLS_CHECK:-}" ]; then  # only asked whether they are built
  echo "llama.cpp tools ($VERSION, $LEVEL): not built in $DEST"
  exit 3
fi

for tool in c++ cc; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "llama.cpp tools: '$tool' not found; install a C/C++ compiler (Debian: build-essential)" >&2
    exit 1
  }
done

mkdir -p "$WHEELHOUSE"
SDIST="$WHEELHOUSE/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  echo "llama.cpp tools: fetching the llama-cpp-python $VERSION sdist into $WHEELHOUSE"
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$WHEELHOUSE" "llama-cpp-python==$VERSION"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/llama-tools.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM
if ! command -v cmake >/dev/null 2>&1; then  # as the wheel's own build does: cmake from PyPI
  echo "llama.cpp tools: no cmake on PATH; using PyPI's cmake for this build"
  "$PYTHON" -m pip install -q --target "$WORK/cmake" cmake
  PATH="$WORK/cmake/bin:$PATH"
  export PYTHONPATH="$WORK/cmake${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "llama.cpp tools ($VERSION, $LEVEL): building $TOOLS once ($JOBS jobs) into $DEST"
START=$(date +%s)
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { echo "llama.cpp tools: no vendor/llama.cpp in $SDIST" >&2; exit 1; }
for f in tools/perplexity/perplexity.cpp tools/imatrix/imatrix.cpp; do
  [ "$(grep -c '^    llama_backend_free();$' "$SRC/$f")" = 1 ] || {
    echo "llama.cpp tools: $f is not the expected source; can't apply $PATCH" >&2; exit 1; }
  sed -i 's|^    llama_backend_free();$|    common_log_pause(common_log_main()); // medgemma-edge: drain the log\n    llama_backend_free();|' "$SRC/$f"
done

# shellcheck disable=SC2086  # FLAGS is a word list on purpose
cmake -S "$SRC" -B "$WORK/build" $FLAGS >"$WORK/configure.log" 2>&1 || {
  tail -n 30 "$WORK/configure.log" >&2; exit 1; }
# shellcheck disable=SC2086
cmake --build "$WORK/build" --parallel "$JOBS" --target $TOOLS >"$WORK/build.log" 2>&1 || {
  tail -n 40 "$WORK/build.log" >&2; exit 1; }
SECONDS_TAKEN=$(( $(date +%s) - START ))

STAGE="$WORK/out"
mkdir -p "$STAGE/bin"
for t in $TOOLS; do
  cp "$WORK/build/bin/$t" "$STAGE/bin/$t"
  strip "$STAGE/bin/$t" 2>/dev/null || true
done
cat >"$STAGE/BUILD-INFO.json" <<EOF
{"llama_cpp_python": "$VERSION", "cpu": "$CPU", "level": "$LEVEL", "arch": "$ARCH",
 "requires": "$REQUIRES", "cmake_flags": "$FLAGS", "patch": "$PATCH", "flags_key": "$KEY",
 "build_seconds": $SECONDS_TAKEN, "jobs": $JOBS, "built": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
 "compiler": "$(c++ --version | head -n1 | tr -d '"\\')"}
EOF
# into place by rename (same filesystem); a build that finished first meanwhile wins
PARTIAL="$DEST.partial-$$"
rm -rf "$PARTIAL"
mv "$STAGE" "$PARTIAL"
if ! mv -T "$PARTIAL" "$DEST" 2>/dev/null; then
  rm -rf "$PARTIAL"
  complete "$DEST" || { echo "llama.cpp tools: could not move the build to $DEST" >&2; exit 1; }
fi
# an older build of this version and CPU level (other flags or patch) is replaced, not kept
for old in "$WHEELHOUSE/llama-tools-$VERSION-$LEVEL-"*; do
  case "$old" in "$DEST"|*.partial-*) ;; *) rm -rf "$old" ;; esac
done
echo "llama.cpp tools ($VERSION, $LEVEL): built in ${SECONDS_TAKEN}s -> $DEST"
