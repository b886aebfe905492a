#!/usr/bin/env bash
# GPTQModel 7.6.0 for bench_quantize.py's `defaults` row on a GPU machine with no internet (its
# Python 3.12 has torch, transformers and a C compiler, but neither GPTQModel nor PCRE2's headers).
#
#   bash bench/gptqmodel_offline.sh download   # here, with internet: wheels, sdist and .debs into .whl/
#   source bench/gptqmodel_offline.sh install  # there, in the repository root: builds PyPcre, installs
#                                              # everything under /tmp/site and puts it on PYTHONPATH
case "${1:-}" in
download)
    set -euo pipefail
    mkdir -p .whl
    python3 -m pip wheel --no-deps -w .whl gptqmodel==7.6.0 device-smi==0.5.7 tokenicer==0.0.14 logbar==0.4.15 defuser==0.0.28
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        torchao==0.18.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    python3 -m pip download --no-deps --no-binary=pypcre -d .whl pypcre==0.6.4  # no binary wheels: built there
    (cd .whl && apt-get download libpcre2-dev libpcre2-8-0)  # PCRE2's headers and static library
    ;;
install)  # sourced: no `set -e` here, it would stay set in the caller's shell
    rm -rf /tmp/pcre2 /tmp/pcre-wheel
    for deb in .whl/libpcre2-*.deb; do dpkg -x "$deb" /tmp/pcre2; done
    lib=$(dirname "$(find /tmp/pcre2 -name libpcre2-8.a | head -1)")
    PYPCRE_INCLUDE_DIR=/tmp/pcre2/usr/include PYPCRE_LIBRARY_PATH="$lib/libpcre2-8.a" \
        python3 -m pip wheel -q --no-build-isolation --no-deps -w /tmp/pcre-wheel .whl/pypcre-*.tar.gz &&
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl /tmp/pcre-wheel/*.whl &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} &&
        python3 -c "import gptqmodel, pcre; print('gptqmodel', gptqmodel.__version__)"
    ;;
*)
    echo "usage: bash bench/gptqmodel_offline.sh download | source bench/gptqmodel_offline.sh install" >&2
    return 2 2>/dev/null || exit 2
    ;;
esac
