#!/usr/bin/env bash
# Provision an ONNX Runtime root (include/ + lib/, the layout of the official release archive) for the C++
# runner, from package registries only:
#   headers  Debian 13 (trixie)'s libonnxruntime-dev, fetched with apt-get download (not installed) and
#            unpacked with dpkg -x; no PyPI or npm package ships the C/C++ headers.
#   library  symlinks to the libonnxruntime.so.1.* (and its provider plugins) of the installed Python wheel,
#            so the C++ runner and the Python harness run the very same runtime.
# The headers (ORT_API_VERSION 21) are older than the wheel: the C API is backward compatible, and the runner
# asks for the version its headers declare.
#
# Usage: provision_ort.sh [DEST]    (prints DEST on its last line of stdout)
#   DEST      default: ${XDG_CACHE_HOME:-~/.cache}/capsbench/onnxruntime-<wheel version>
#   PYTHON    the interpreter whose onnxruntime wheel to link (default: the repo's .venv, else python3)
#   ORT_DEB_SUITE, ORT_DEB_MIRROR   where the headers come from (default: trixie, http://deb.debian.org/debian)
# Idempotent: a second call only re-checks the symlinks (well under a second). Needs apt-get and dpkg-deb
# (Debian/Ubuntu) the first time; elsewhere, unpack the official release archive and pass its folder to
# CMake as -DONNXRUNTIME_ROOT=... instead.
set -euo pipefail

die() {
    echo "provision_ort.sh: $*" >&2
    exit 1
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
suite=${ORT_DEB_SUITE:-trixie}
mirror=${ORT_DEB_MIRROR:-http://deb.debian.org/debian}

# The wheel's shared library: what the runner links and runs.
read -r ort_version capi < <("$PYTHON" -c \
    'import onnxruntime as o, os; print(o.__version__, os.path.join(os.path.dirname(o.__file__), "capi"))' \
    2>/dev/null) || die "$PYTHON cannot import onnxruntime; run scripts/install.sh (or set PYTHON=...)"
lib=$(find "$capi" -maxdepth 1 -name 'libonnxruntime.so.1*' -type f | sort | tail -n 1)
[ -n "$lib" ] || die "no libonnxruntime.so.1.* in $capi; reinstall the onnxruntime wheel"

dest=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/capsbench/onnxruntime-$ort_version}
mkdir -p "$dest/lib" "$dest/deb"
dest=$(cd "$dest" && pwd)
if command -v flock >/dev/null; then # two builds provisioning at once take turns
    exec 9>"$dest/.lock"
    flock 9
fi

# Library: libonnxruntime.so.1 (the SONAME the runner records), libonnxruntime.so (for the linker), and the
# provider plugins, which ONNX Runtime looks for next to the path it was loaded from.
ln -sfn "$lib" "$dest/lib/libonnxruntime.so.1"
ln -sfn libonnxruntime.so.1 "$dest/lib/libonnxruntime.so"
for plugin in "$capi"/libonnxruntime_providers_*.so; do
    [ -e "$plugin" ] && ln -sfn "$plugin" "$dest/lib/$(basename "$plugin")"
done

# Headers: fetched once, then cached (the .deb and the unpacked headers both stay in DEST).
if [ ! -f "$dest/include/onnxruntime_cxx_api.h" ]; then
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
        die "apt-get/dpkg-deb not found: unpack ONNX Runtime's release archive and pass -DONNXRUNTIME_ROOT=<it>"
    keyring=""
    for k in "/usr/share/keyrings/debian-archive-$suite-stable.gpg" /usr/share/keyrings/debian-archive-keyring.gpg; do
        if [ -f "$k" ]; then keyring=$k && break; fi
    done
    [ -n "$keyring" ] || die "no Debian archive keyring for $suite (apt-get install debian-archive-keyring)"

    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
    echo "deb [signed-by=$keyring] $mirror $suite main" >"$tmp/sources.list"
    # Everything apt writes goes to $tmp: the machine's own package lists and cache stay untouched.
    apt_opts=(
        -o "Dir::Etc::sourcelist=$tmp/sources.list" -o Dir::Etc::sourceparts=-
        -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o APT::Get::List-Cleanup=0
        -o APT::Sandbox::User="$(id -un)" -o Debug::NoLocking=1
    )
    if ! ls "$dest"/deb/libonnxruntime-dev_*.deb >/dev/null 2>&1; then
        echo "fetching libonnxruntime-dev from Debian $suite ..." >&2
        apt-get -qq "${apt_opts[@]}" update >"$tmp/log" 2>&1 ||
            die "apt-get update for Debian $suite failed: $(tail -n 3 "$tmp/log" | tr '\n' ' ')"
        (cd "$tmp" && apt-get -qq "${apt_opts[@]}" download libonnxruntime-dev >>"$tmp/log" 2>&1) ||
            die "apt-get download libonnxruntime-dev failed: $(tail -n 3 "$tmp/log" | tr '\n' ' ')"
        mv "$tmp"/libonnxruntime-dev_*.deb "$dest/deb/"
    fi
    deb=$(ls "$dest"/deb/libonnxruntime-dev_*.deb | tail -n 1)
    dpkg-deb -x "$deb" "$tmp/root" || die "cannot unpack $deb; delete it and rerun"
    [ -f "$tmp/root/usr/include/onnxruntime/onnxruntime_cxx_api.h" ] || die "$deb holds no onnxruntime_cxx_api.h"
    rm -rf "$dest/include.tmp"
    cp -r "$tmp/root/usr/include/onnxruntime" "$dest/include.tmp"
    rm -rf "$dest/include"
    mv "$dest/include.tmp" "$dest/include" # last: a half-copied include/ never looks finished
fi

api=$(sed -n 's/^#define ORT_API_VERSION \([0-9]*\).*/\1/p' "$dest/include/onnxruntime_c_api.h")
cat >"$dest/PROVENANCE" <<EOF
headers  $(basename "$(ls "$dest"/deb/libonnxruntime-dev_*.deb 2>/dev/null | tail -n 1)" 2>/dev/null) (ORT_API_VERSION $api)
library  $lib (onnxruntime $ort_version)
EOF
echo "$dest"
