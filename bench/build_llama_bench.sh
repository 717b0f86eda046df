#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-cli from source for side-by-side figures and outputs:
#   bash bench/build_llama_bench.sh [DIR]      (default DIR: ~/.cache/llamachat/llama-bench)
#   python bench/run_bench.py -m FILE --llama-bench DIR/llama.cpp/build/bin/llama-bench
#   python bench/compare_greedy.py -m FILE --llama-cli DIR/llama.cpp/build/bin/llama-cli
# The source is the llama.cpp that llama-cpp-python vendors in its sdist (the package index is
# the one network source this project relies on); needs cmake and a C++ compiler. Built for
# this CPU (GGML_NATIVE), those two tools only: about 3 minutes on 2 cores.
set -euo pipefail
version=0.3.16
dir=${1:-$HOME/.cache/llamachat/llama-bench}
mkdir -p "$dir"
cd "$dir"
if [ ! -d llama.cpp ]; then
    python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d .
    tar xzf "llama_cpp_python-$version.tar.gz"
    mv "llama_cpp_python-$version/vendor/llama.cpp" llama.cpp
    rm -rf "llama_cpp_python-$version" "llama_cpp_python-$version.tar.gz"
fi
log="$dir/build.log"
if ! { cmake -S llama.cpp -B llama.cpp/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF &&
       cmake --build llama.cpp/build --target llama-bench llama-cli -j"$(nproc)"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "building llama-bench failed; the whole log is $log" >&2
    exit 1
fi
echo "$dir/llama.cpp/build/bin/llama-bench"
echo "$dir/llama.cpp/build/bin/llama-cli"
