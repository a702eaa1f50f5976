#!/usr/bin/env bash
# Gather what benchmarks/gpu/run_on_gpu.sh needs on a GPU machine without network, into
# DEST (default: .gpu of this checkout; keep it out of git, e.g. in .git/info/exclude):
#
#   DEST/modeld.tar.gz                          this checkout's HEAD (+ .commit)
#   DEST/whl/*.whl                              runtime and test packages the machine's
#                                               image lacks, for CPython 3.12 x86-64
#   DEST/llama_cpp_python-0.3.36-trim.tar.gz    the sdist less what a library build never
#                                               reads (vendored vocabularies, docs,
#                                               examples, tests, tools, other backends)
#
#   bash benchmarks/gpu/pack.sh [DEST]
set -euo pipefail

ROOT=$(git rev-parse --show-toplevel)
DEST=$(realpath -m "${1:-$ROOT/.gpu}")
mkdir -p "$DEST/whl"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir "$work/src"
git -C "$ROOT" archive HEAD | tar x -C "$work/src"
git -C "$ROOT" rev-parse --short HEAD >"$work/src/.commit"
tar czf "$DEST/modeld.tar.gz" -C "$work/src" .
echo "modeld.tar.gz: $(cat "$work/src/.commit")"

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST/whl" \
    starlette==1.10.0 hypercorn==0.18.0 h11==0.16.0 h2==4.4.1 hpack==4.2.0 hyperframe==6.1.0 \
    priority==2.0.0 wsproto==1.3.2 msgspec==0.22.0 orjson==3.13.0 loguru==0.7.3 \
    gguf==0.19.0 diskcache==5.6.3 trio==0.35.0 outcome==1.3.0.post0 sniffio==1.3.1 \
    anyio==4.16.0 attrs==26.1.0 typing_extensions==4.16.0

sdist="$DEST/llama_cpp_python-0.3.36-trim.tar.gz"
if [ ! -f "$sdist" ]; then
    # --no-binary for this one package only: build requirements may stay wheels
    python3 -m pip download -q --no-deps --no-binary llama-cpp-python -d "$work" \
        llama-cpp-python==0.3.36
    tar xzf "$work"/llama_cpp_python-0.3.36.tar.gz -C "$work"
    top="$work/llama_cpp_python-0.3.36"
    vendored="$top/vendor/llama.cpp"
    rm -rf "$top"/{.git,.github,examples,docs,docker,tests,scripts}
    rm -rf "$vendored"/{.git,.github,.devops,models,docs,examples,benches,tests,media,gguf-py} \
        "$vendored"/{conversion,pocs,skills,ci,app,grammars,requirements} "$vendored"/*.py \
        "$vendored"/scripts/*.py "$vendored"/tools/{ui,server,llama-bench,perplexity}
    for backend in vulkan sycl opencl metal hexagon webgpu openvino cann et virtgpu zdnn zendnn; do
        rm -rf "$vendored/ggml/src/ggml-$backend"
    done
    tar czf "$sdist" -C "$work" llama_cpp_python-0.3.36
fi
# FALLBACK_WHEEL=path: a llama-cpp-python wheel built elsewhere, carried as an installed
# package with each library once (a wheel holds three copies of each; a CUDA one is 266 MB)
if [ -n "${FALLBACK_WHEEL:-}" ]; then
    mkdir -p "$work/site" "$DEST/fallback"
    python3 -m pip install -q --no-deps --no-compile --target "$work/site" "$FALLBACK_WHEEL"
    find "$work/site" -mindepth 1 -maxdepth 1 ! -name llama_cpp ! -name '*.dist-info' \
        -exec rm -rf {} +  # headers, CMake files, a second copy of the libraries
    for lib in "$work"/site/llama_cpp/lib/lib*.so.*.*; do  # libX.so.0.25.3: keep libX.so.0
        [ -e "$lib" ] || continue
        soname=${lib%.*.*}
        mv "$soname" "$soname.keep" && rm -f "$lib" "${soname%.*}" && mv "$soname.keep" "$soname"
        ln -s "$(basename "$soname")" "$lib" && ln -s "$(basename "$soname")" "${soname%.*}"
    done
    tar czf "$DEST/fallback/llama_cpp_site.tar.gz" -C "$work/site" .
fi
du -sh "$DEST"/* | sed "s|$DEST/||"
