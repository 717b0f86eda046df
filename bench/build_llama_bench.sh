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
#   bash bench/build_llama_bench.sh DIR avx2   llama-bench alone, built for AVX2 (FMA, F16C, BMI2)
#                                              and nothing newer, in DIR/llama.cpp/build-avx2: what
#                                              an AVX2-only CPU runs, beside `llamachat bench --isa avx2`
set -euo pipefail
version=0.3.16
dir=${1:-$HOME/.cache/llamachat/llama-bench}
only=${2:-}
if [[ -n "$only" && "$only" != avx2 ]]; then
    echo "unknown instruction set '$only': the one this script builds for alone is avx2" >&2
    exit 2
fi
mkdir -p "$dir"
cd "$dir"
if [ ! -d llama.cpp ]; then
    python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d .
    tar xzf "llama_cpp_python-$version.tar.gz"
    mv "llama_cpp_python-$version/vendor/llama.cpp" llama.cpp
    rm -rf "llama_cpp_python-$version" "llama_cpp_python-$version.tar.gz"
fi
log="$dir/build.log"
build=llama.cpp/build
targets=(llama-bench llama-cli llama-server)
cpu_flags=()
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
if [[ "$only" == avx2 ]]; then
    log="$dir/build-avx2.log"
    build=llama.cpp/build-avx2
    targets=(llama-bench)
    cpu_flags+=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
                -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
                -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
elif [[ "$flags" == *" amx_tile "* ]]; then
    cpu_flags+=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
                avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
        if [[ "$flags" == *" ${pair%%:*} "* ]]; then cpu_flags+=("-DGGML_${pair##*:}=ON"); fi
    done
else
    cpu_flags+=(-DGGML_NATIVE=ON)
fi
if ! { cmake -S llama.cpp -B "$build" -DCMAKE_BUILD_TYPE=Release "${cpu_flags[@]}" -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON &&
       cmake --build "$build" --target "${targets[@]}" -j"$(nproc)"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "building llama-bench failed; the whole log is $log" >&2
    exit 1
fi
for t in "${targets[@]}"; do echo "$dir/$build/bin/$t"; done
