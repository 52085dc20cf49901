#!/usr/bin/env bash
# llama-cpp-python (the [gguf] extra) for the test set-up: 80 s on 2 cores instead of pip's 13 minutes.
#
#   tools/build_llama_cpp.sh PYTHON VERSION CACHE_DIR
#
# PyPI has no Linux wheel of llama-cpp-python, and its own source build also compiles llama.cpp's `common`
# library (argument parsing, chat templates, JSON: about 1.1 MB of template-heavy C++ that the Python package
# never loads; its CMakeLists forces it on), which is most of the 791 s that `pip install llama-cpp-python` took
# here. This script compiles only the four libraries the package loads (ggml-base, ggml-cpu, ggml, llama) from
# the same sdist's vendored llama.cpp, installs the package's Python code with its native build switched off
# (LLAMA_BUILD=OFF), and puts the libraries in the package's lib/ folder, where it looks for them.
#
# The built libraries and the sdist are kept in CACHE_DIR (written to a temporary folder, then renamed), so a
# second set-up, a new venv or a fresh clone on the same machine installs in seconds without compiling.
set -euo pipefail
PY=$1 VERSION=$2 CACHE=$3

if [ ! -f "$CACHE/lib/libllama.so" ]; then
  for tool in cmake c++; do
    command -v $tool >/dev/null || { echo "build_llama_cpp: $tool is not installed (apt-get install cmake g++)" >&2; exit 1; }
  done
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK/sdist"
  tar -xzf "$WORK"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
  # GGML_NATIVE (the default): one CPU backend for this machine's instruction set, as pip's build makes
  cmake -S "$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON >"$WORK/cmake.log"
  echo "build_llama_cpp: compiling llama.cpp (llama-cpp-python $VERSION: ggml and llama only) ..."
  cmake --build "$WORK/build" --target llama -j "$(nproc)" >"$WORK/build.log" 2>&1 || {
    tail -20 "$WORK/build.log" >&2; exit 1; }
  mkdir -p "$(dirname "$CACHE")"
  STAGE=$(mktemp -d "$CACHE.XXXXXX")
  mkdir "$STAGE/lib"
  find "$WORK/build/bin" -maxdepth 1 -name 'lib*.so*' -exec cp -a {} "$STAGE/lib/" \;
  cp "$WORK"/sdist/llama_cpp_python-"$VERSION".tar.gz "$STAGE/"
  rm -rf "$CACHE"
  mv "$STAGE" "$CACHE"
fi

# the package's Python code and its dependencies (PIP_CONSTRAINT pins them): its CMakeLists builds nothing with
# LLAMA_BUILD and LLAVA_BUILD off
"$PY" -m pip uninstall -q -y llama-cpp-python >/dev/null 2>&1 || true
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install -q "$CACHE/llama_cpp_python-$VERSION.tar.gz"
PKG=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent)")
mkdir -p "$PKG/lib"
cp -a "$CACHE"/lib/lib*.so* "$PKG/lib/"
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'with', llama_cpp.llama_print_system_info().decode()[:60], '...')"
