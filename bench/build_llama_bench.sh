#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-cli from source for side-by-side figures and outputs:
#   bash bench/build_llama_bench.sh [DIR]      (default DIR: ~/.cache/llamachat/llama-bench)
#   python bench/run_bench.py -m FILE --llama-bench DIR/llama.cpp/build/bin/llama-bench
#   python bench/compare_greedy.py -m FILE --llama-cli DIR/llama.cpp/build/bin/llama-cli
# The source is the llama.cpp that llama-cpp-python vendors in its sdist (the package index is
# the one network source this project relies on); needs cmake and a C++ compiler. Built for
# this CPU, those tools only (and llama-server, for bench/check_remote_llama_server.py): about
# 3 minutes on 2 cores. A CPU that lists AMX may still not grant its state (some VMs): AMX
# instructions then die with SIGILL, so where /proc/cpuinfo lists amx_tile the build names
# each instruction set the CPU has instead of -march=native, AMX left out.
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
cpu_flags=()
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
if [[ "$flags" == *" amx_tile "* ]]; then
    cpu_flags+=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
                avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
        if [[ "$flags" == *" ${pair%%:*} "* ]]; then cpu_flags+=("-DGGML_${pair##*:}=ON"); fi
    done
else
    cpu_flags+=(-DGGML_NATIVE=ON)
fi
if ! { cmake -S llama.cpp -B llama.cpp/build -DCMAKE_BUILD_TYPE=Release "${cpu_flags[@]}" -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON &&
       cmake --build llama.cpp/build --target llama-bench llama-cli llama-server -j"$(nproc)"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "building llama-bench failed; the whole log is $log" >&2
    exit 1
fi
echo "$dir/llama.cpp/build/bin/llama-bench"
echo "$dir/llama.cpp/build/bin/llama-cli"
echo "$dir/llama.cpp/build/bin/llama-server"
