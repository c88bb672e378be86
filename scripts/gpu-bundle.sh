#!/usr/bin/env bash
# An offline bundle for an air-gapped GPU host: everything scripts/gpu-check.sh needs there that the host lacks,
# split into parts of a size the caller chooses, with a SHA-256 manifest and the one command that joins them,
# verifies every part and every whole file, installs offline and runs the GPU check.
#
#   scripts/gpu-bundle.sh --out DIR [--python 3.12] [--cuda-major 13] [--part-size 60M] [--have FREEZE]
#                         [--exclude NAME]... [--wheel-dir DIR] [--offline] [--data-dir DIR] [--ort-headers DIR]
#   # carry DIR's files to the host (each part at most --part-size), then there:
#   bash DIR/join.sh [--dest DIR] [--python PY] [--verify-only | --no-check] [gpu-check options...]
#
# What goes in (each a whole file, then split into DIR/parts/<file>.part-NNN):
#   wheels/*.whl          onnxruntime-gpu for the host's CUDA major and Python, and every other requirement of
#                         capsbench (pyproject's dependencies, pytest for the cuda tests, setuptools>=68 for the
#                         offline editable install) with their requirements, for CPython --python on manylinux
#                         x86_64, less what the host already has at a fitting version (--have: the host's
#                         `pip list --format=freeze`) and less --exclude. torch is never bundled: the host's stays.
#   capsbench-src.tar.gz  this checkout (tracked and untracked, not ignored files): gpu-check runs its tests and
#                         scripts from a checkout, and installs it in place (pip -e, offline).
#   ort-include.tar.gz    ONNX Runtime's C/C++ headers for the C++ runner (no registry on the host to fetch them;
#                         default: those export/cpp/provision_ort.sh provisions here, or --ort-headers DIR).
#   data.tar.gz           the Fashion-MNIST files (capsbench's data folder, or --data-dir).
# Beside the parts: MANIFEST.sha256 (every part, then every whole file, sha256sum's format), bundle.txt (what
# is in it, for whom) and join.sh.
#
# onnxruntime-gpu: pyproject pins onnxruntime-gpu==1.31.1, a CUDA 13 build (its build_and_package_info says
# cuda_version 13.0; libcudart.so.13). PyPI has no CUDA 12 build of that version (one wheel per tag, and no
# -cu12 package), so --cuda-major 12 needs a CUDA 12 build of it in --wheel-dir (ONNX Runtime publishes those
# outside PyPI), else it is refused in one line. Every bundled onnxruntime-gpu wheel's own build info is read and
# must name the CUDA major asked for.
#
# Wheels come from PyPI (pip download), and from --wheel-dir first when given (pip --find-links); --offline
# uses --wheel-dir alone (pip --no-index). Errors: one line on stderr, exit 2.
set -euo pipefail

die() {
    echo "gpu-bundle: $*" >&2
    exit 2
}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --out DIR          where the bundle goes (must not exist, or be empty)
  --python X.Y       the host's Python (default 3.12): wheels for CPython X.Y on manylinux x86_64
  --cuda-major N     the host's CUDA major, 12 or 13 (default 13): which onnxruntime-gpu build
  --part-size SIZE   largest part, as split -b takes it: 60M (MiB), 512K, 1G, or bytes (default 60M)
  --have FILE        the host's `pip list --format=freeze`: what it has is not bundled when its version fits
  --exclude NAME     leave NAME out (repeatable); torch always is
  --wheel-dir DIR    wheels to take first (pip --find-links); --offline: only from there (pip --no-index)
  --data-dir DIR     capsbench's data folder holding fashion-mnist/ (default: capsbench's own)
  --ort-headers DIR  a folder with onnxruntime_cxx_api.h (default: export/cpp/provision_ort.sh's)
  --help             this text
EOF
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -x "$repo/.venv/bin/python" ]; then PY=${PYTHON:-$repo/.venv/bin/python}; else PY=${PYTHON:-python3}; fi

out="" python_version=3.12 cuda_major=13 part_size=60M have="" wheel_dir="" offline=0 data_dir="" headers=""
excludes=()
while [ $# -gt 0 ]; do
    case "$1" in
        --help | -h) usage; exit 0 ;;
        --offline) offline=1; shift; continue ;;
    esac
    [ $# -ge 2 ] || die "$1 needs a value (see --help)"
    case "$1" in
        --out) out=$2 ;;
        --python) python_version=$2 ;;
        --cuda-major) cuda_major=$2 ;;
        --part-size) part_size=$2 ;;
        --have) have=$2 ;;
        --exclude) excludes+=("$2") ;;
        --wheel-dir) wheel_dir=$2 ;;
        --data-dir) data_dir=$2 ;;
        --ort-headers) headers=$2 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift 2
done

[ -n "$out" ] || die "--out DIR is required (see --help)"
[[ "$python_version" =~ ^3\.[0-9]+$ ]] || die "--python needs X.Y (e.g. 3.12), got '$python_version'"
[[ "$cuda_major" =~ ^(12|13)$ ]] || die "--cuda-major must be 12 or 13, got '$cuda_major'"
[[ "$part_size" =~ ^[1-9][0-9]*[KMG]?$ ]] || die "--part-size needs a size like 60M, 512K, 1G or bytes, got '$part_size'"
[ -z "$have" ] || [ -f "$have" ] || die "--have $have: no such file (on the host: pip list --format=freeze > FILE)"
[ -z "$wheel_dir" ] || [ -d "$wheel_dir" ] || die "--wheel-dir $wheel_dir: no such folder"
[ "$offline" = 0 ] || [ -n "$wheel_dir" ] || die "--offline needs --wheel-dir (where the wheels come from)"
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then die "--out $out is not empty"; fi
for tool in split sha256sum tar gzip git; do
    command -v "$tool" >/dev/null || die "needs $tool (coreutils, tar, gzip, git)"
done

# Data: the dataset folder.
if [ -z "$data_dir" ]; then
    data_dir=$("$PY" -c 'from capsbench.suite.data.registry import resolve_data_dir; print(resolve_data_dir(None))' \
        2>/dev/null) || die "cannot find capsbench's data folder; pass --data-dir"
fi
[ -d "$data_dir/fashion-mnist" ] && [ -n "$(ls -A "$data_dir/fashion-mnist")" ] ||
    die "no Fashion-MNIST in $data_dir/fashion-mnist (capsbench data fetch, or --data-dir)"

# Headers: the C++ runner's ONNX Runtime headers.
if [ -z "$headers" ]; then
    root=$(PYTHON="$PY" bash "$repo/export/cpp/provision_ort.sh" 2>/dev/null | tail -n 1) ||
        die "provisioning ONNX Runtime's headers failed (bash export/cpp/provision_ort.sh says why); or --ort-headers DIR"
    headers=$root/include
fi
[ -f "$headers/onnxruntime_cxx_api.h" ] || die "--ort-headers $headers has no onnxruntime_cxx_api.h"

mkdir -p "$out"
out=$(cd "$out" && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/files" "$stage/wheels" "$out/parts"

# ------------------------------------------------------------------------------------------------------ wheels
# A small resolver: the requirements, then each bundled wheel's own Requires-Dist (markers for the host's
# Python on Linux x86_64), each fetched alone with pip download --no-deps for the host's tags.
"$PY" - "$repo/pyproject.toml" "$stage/wheels" "$python_version" "$cuda_major" "$have" "$wheel_dir" "$offline" \
    "${excludes[@]+"${excludes[@]}"}" <<'PY' || exit 2
import re
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

try:
    import tomllib
except ImportError:
    from pip._vendor import tomli as tomllib

pyproject, dest, pyver, cuda_major, have_file, wheel_dir, offline, *excluded = sys.argv[1:]
dest = Path(dest)


def die(msg: str) -> None:
    print(f"gpu-bundle: {msg}", file=sys.stderr)
    sys.exit(2)


deps = tomllib.loads(Path(pyproject).read_text())["project"]["dependencies"]
ort_pin = next((d for d in deps if canonicalize_name(Requirement(d).name) == "onnxruntime-gpu"), None)
if ort_pin is None:
    die("pyproject.toml has no onnxruntime-gpu requirement")
# The pinned wheel's CUDA major (read off its build_and_package_info: cuda_version 13.0); every downloaded or
# provided wheel is checked again below.
PINNED_CUDA_MAJOR = {"1.31.1": "13"}
pinned = next(iter(Requirement(ort_pin).specifier)).version
wanted = [d for d in deps if canonicalize_name(Requirement(d).name) not in ("torch", "onnxruntime-gpu")]
wanted += ["pytest>=8", "setuptools>=68"]

have: dict[str, str | None] = {}
if have_file:
    for line in Path(have_file).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "==" in line:
            name, version = line.split("==", 1)
            have[canonicalize_name(name)] = version.strip()
        elif " @ " in line:  # a local or VCS install: present, version unknown
            have[canonicalize_name(line.split(" @ ", 1)[0])] = None
skip = {canonicalize_name(n) for n in excluded} | {"torch"}
env = {
    "python_version": pyver,
    "python_full_version": f"{pyver}.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_version": f"{pyver}.0",
    "platform_release": "",
    "platform_version": "",
}
tag = "cp" + pyver.replace(".", "")
platforms = ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64"]
platforms += ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def fetch(req: str) -> Path:
    """One wheel for the host's tags, its requirements left out (they are resolved here)."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp]
        cmd += ["--python-version", pyver, "--implementation", "cp", "--abi", tag, "--abi", "abi3", "--abi", "none"]
        for p in platforms:
            cmd += ["--platform", p]
        if wheel_dir:
            cmd += ["--find-links", wheel_dir]
        if offline == "1":
            cmd += ["--no-index"]
        res = subprocess.run([*cmd, req], capture_output=True, text=True)
        got = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or len(got) != 1:
            last = (res.stderr.strip().splitlines() or ["no wheel"])[-1]
            where = f" in {wheel_dir}" if offline == "1" else ""
            die(f"no wheel of {req} for CPython {pyver} on manylinux x86_64{where}: {last}")
        target = dest / got[0].name
        got[0].replace(target)
        return target


def metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())


def ort_cuda_major(wheel: Path) -> str | None:
    with zipfile.ZipFile(wheel) as z:
        info = next((n for n in z.namelist() if n.endswith("capi/build_and_package_info.py")), None)
        text = z.read(info).decode() if info else ""
    m = re.search(r"cuda_version\s*=\s*['\"](\d+)", text)
    return m.group(1) if m else None


# onnxruntime-gpu for the host's CUDA major: the pinned (CUDA 13) wheel, or a CUDA 12 build of the same version
# from --wheel-dir.
queue: list[tuple[str, str]] = []
chosen: dict[str, Path] = {}
if "onnxruntime-gpu" in skip:
    pass
elif cuda_major != PINNED_CUDA_MAJOR.get(pinned, cuda_major):
    provided = sorted(Path(wheel_dir).glob(f"onnxruntime_gpu-{pinned}-*.whl")) if wheel_dir else []
    fit = [w for w in provided if ort_cuda_major(w) == cuda_major]
    if not fit:
        die(
            f"onnxruntime-gpu {pinned} on PyPI is a CUDA {PINNED_CUDA_MAJOR[pinned]} build and PyPI has no CUDA "
            f"{cuda_major} wheel of it: put a CUDA {cuda_major} build of onnxruntime-gpu {pinned} for CPython "
            f"{pyver} in --wheel-dir, or use a host with CUDA {PINNED_CUDA_MAJOR[pinned]} (torch cu130, driver >= 580)"
        )
    target = dest / fit[0].name
    target.write_bytes(fit[0].read_bytes())
    chosen["onnxruntime-gpu"] = target
    queue += [(r, "onnxruntime-gpu") for r in metadata(target).get_all("Requires-Dist") or []]
elif have.get("onnxruntime-gpu") != pinned:  # the host's own onnxruntime-gpu of that version is the same wheel
    queue.append((ort_pin, "pyproject.toml"))
queue += [(r, "capsbench") for r in wanted]

while queue:
    text, wanted_by = queue.pop(0)
    req = Requirement(text)
    name = canonicalize_name(req.name)
    if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
        continue
    if name in skip:
        continue
    if name in have and (have[name] is None or req.specifier.contains(have[name], prereleases=True)):
        continue
    if name in chosen:
        version = metadata(chosen[name])["Version"]
        if not req.specifier.contains(version, prereleases=True):
            die(f"{wanted_by} needs {text}, but {chosen[name].name} is bundled; resolve by hand")
        continue
    wheel = fetch(f"{req.name}{req.specifier}")
    chosen[name] = wheel
    meta = metadata(wheel)
    for dep in meta.get_all("Requires-Dist") or []:
        d = Requirement(dep)
        if d.marker is None or any(d.marker.evaluate({**env, "extra": e}) for e in (req.extras or {""})):
            d.marker = None
            queue.append((str(d), meta["Name"]))

for name, wheel in chosen.items():
    if name == "onnxruntime-gpu":
        major = ort_cuda_major(wheel)
        if major != cuda_major:
            die(f"{wheel.name} is built for CUDA {major or 'unknown'}, not the host's CUDA {cuda_major}")
    print(f"  {wheel.name}" + (f" (the host has {name} {have[name]})" if name in have else ""))
PY

# --------------------------------------------------------------------------------------------- the other files
shopt -s nullglob
for w in "$stage"/wheels/*.whl; do mv "$w" "$stage/files/"; done
# Deterministic tarballs (sorted, no times or owners): the same inputs give the same bytes and checksums.
det_tar() { tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -c "$@" | gzip -n; }
# (Files deleted in the work tree but still in git's index are left out.)
(cd "$repo" && git ls-files -z -c -o --exclude-standard | while IFS= read -r -d '' f; do
    if [ -f "$f" ]; then printf '%s\0' "$f"; fi
done | det_tar --null --no-recursion -T -) \
    >"$stage/files/capsbench-src.tar.gz" || die "cannot pack the checkout $repo (is it a git repository?)"
det_tar -C "$headers" . >"$stage/files/ort-include.tar.gz"
det_tar -C "$data_dir" fashion-mnist >"$stage/files/data.tar.gz"

# ------------------------------------------------------------------------------------------ parts and manifest
: >"$stage/parts.sha256"
: >"$stage/files.sha256"
for f in "$stage"/files/*; do
    name=$(basename "$f")
    split -b "$part_size" -d -a 3 "$f" "$out/parts/$name.part-"
    parts=("$out/parts/$name".part-*)
    [ ${#parts[@]} -gt 0 ] || cp "$f" "$out/parts/$name.part-000" # an empty file is one empty part
    (cd "$out" && sha256sum "parts/$name".part-*) >>"$stage/parts.sha256"
    (cd "$stage/files" && sha256sum "$name") >>"$stage/files.sha256"
done
n_parts=$(wc -l <"$stage/parts.sha256")
[ "$n_parts" -le 1000 ] || die "$n_parts parts: more than 1000; choose a larger --part-size"
{
    echo "# capsbench GPU bundle: every part, then every whole file (paths relative to the bundle's folder)"
    cat "$stage/parts.sha256"
    sed 's#  #  files/#' "$stage/files.sha256"
} >"$out/MANIFEST.sha256"
{
    echo "capsbench GPU bundle, made $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "host: CPython $python_version, CUDA $cuda_major, manylinux x86_64; part size $part_size; $n_parts parts"
    echo "files:"
    (cd "$stage/files" && for f in *; do printf '  %s %s bytes\n' "$f" "$(wc -c <"$f")"; done)
    echo "on the host: bash join.sh [--dest DIR] [--python PY] [--verify-only | --no-check] [gpu-check options]"
} >"$out/bundle.txt"

# ------------------------------------------------------------------------------------------------- join.sh
cat >"$out/join.sh" <<'JOIN'
#!/usr/bin/env bash
# Join a capsbench GPU bundle, verify it, install it offline and run the GPU check (made by scripts/gpu-bundle.sh).
#
#   bash join.sh [--dest DIR] [--python PY] [--verify-only | --no-check] [gpu-check options...]
#
# Every part is checked against MANIFEST.sha256, the parts are joined, and every whole file is checked again: a
# missing or corrupted part stops it with one line and exit 2 (copy that part again). Then, unless --verify-only:
# the checkout, the headers and the data are unpacked in DIR (default: unpacked/ beside this file), the wheels
# are installed with pip --no-index --no-deps into PY's environment (default python3; its torch stays; a CPU-only
# onnxruntime is removed first when onnxruntime-gpu is bundled, as both are the same module),
# then, unless --no-check, the C++ runner's ONNX Runtime root is made from the headers (DIR/onnxruntime) and
# scripts/gpu-check.sh runs from the checkout with --data-dir DIR/data, --out gpu-check.json beside this file
# and the other options given.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "join: $*" >&2; exit 2; }

dest=$here/unpacked py=${PYTHON:-python3} mode=check
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dest) [ $# -ge 2 ] || die "--dest needs a folder"; dest=$2; shift 2 ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; py=$2; shift 2 ;;
        --verify-only) mode=verify; shift ;;
        --no-check) mode=install; shift ;;
        --help | -h) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) args+=("$1"); shift ;;
    esac
done
manifest=$here/MANIFEST.sha256
[ -f "$manifest" ] || die "$manifest: missing (copy the bundle's MANIFEST.sha256 beside join.sh)"
command -v sha256sum >/dev/null || die "sha256sum not found (coreutils)"

# 1. Every part, before anything is written.
while read -r sum path; do
    case "$sum" in "#"* | "") continue ;; esac
    case "$path" in parts/*) ;; *) continue ;; esac
    [ -f "$here/$path" ] || die "$path: missing; copy it again from the bundle"
    got=$(sha256sum "$here/$path") && got=${got%% *}
    [ "$got" = "$sum" ] || die "$path: SHA-256 mismatch (damaged in transfer); copy it again from the bundle"
done <"$manifest"

# 2. Join each whole file from its parts, in the manifest's order, and check it.
mkdir -p "$dest/files"
dest=$(cd "$dest" && pwd)
while read -r sum path; do
    case "$path" in files/*) ;; *) continue ;; esac
    name=${path#files/}
    : >"$dest/files/$name.tmp"
    while read -r _ part; do
        case "$part" in "parts/$name.part-"[0-9][0-9][0-9]) cat "$here/$part" >>"$dest/files/$name.tmp" ;; esac
    done <"$manifest"
    got=$(sha256sum "$dest/files/$name.tmp") && got=${got%% *}
    [ "$got" = "$sum" ] || die "$name: the joined file's SHA-256 does not match the manifest; copy the bundle again"
    mv "$dest/files/$name.tmp" "$dest/files/$name"
done <"$manifest"
n=$(grep -c '  files/' "$manifest")
echo "join: $n files joined and verified in $dest/files"
[ "$mode" != verify ] || exit 0

# 3. Unpack and install offline.
rm -rf "$dest/capsbench" "$dest/onnxruntime" "$dest/data" "$dest/wheels"
mkdir -p "$dest/capsbench" "$dest/onnxruntime/include" "$dest/data" "$dest/wheels"
tar -xzf "$dest/files/capsbench-src.tar.gz" -C "$dest/capsbench"
tar -xzf "$dest/files/ort-include.tar.gz" -C "$dest/onnxruntime/include"
tar -xzf "$dest/files/data.tar.gz" -C "$dest/data"
shopt -s nullglob
for w in "$dest"/files/*.whl; do cp "$w" "$dest/wheels/"; done
wheels=("$dest"/wheels/*.whl)
"$py" -m pip --version >/dev/null 2>&1 || die "$py has no pip; pass --python with the environment that has torch"
if [ ${#wheels[@]} -gt 0 ]; then
    if ls "$dest"/wheels/onnxruntime_gpu-*.whl >/dev/null 2>&1 && "$py" -m pip show -q onnxruntime >/dev/null 2>&1; then
        "$py" -m pip uninstall -q -y onnxruntime || die "cannot remove the CPU-only onnxruntime from $py's environment"
    fi
    "$py" -m pip install -q --no-index --no-deps "${wheels[@]}" ||
        die "pip install --no-index --no-deps of the bundled wheels into $py's environment failed (see above)"
fi
echo "join: installed ${#wheels[@]} wheels into $("$py" -c 'import sys; print(sys.prefix)'); checkout in $dest/capsbench"
[ "$mode" != install ] || exit 0

# 4. The C++ runner's ONNX Runtime root (the bundled headers, the installed wheel's library), then the GPU check
# from the checkout.
PYTHON=$py bash "$dest/capsbench/export/cpp/provision_ort.sh" "$dest/onnxruntime" >/dev/null ||
    die "making the C++ runner's ONNX Runtime root in $dest/onnxruntime failed (see above)"
cd "$dest/capsbench"
export ONNXRUNTIME_ROOT=$dest/onnxruntime
PYTHON=$py exec bash scripts/gpu-check.sh --data-dir "$dest/data" --out "$here/gpu-check.json" ${args[@]+"${args[@]}"}
JOIN
chmod 755 "$out/join.sh"

total=$(du -sb "$out/parts" | cut -f1)
echo "gpu-bundle: $n_parts parts ($total bytes, at most $part_size each) in $out; on the host: bash join.sh"
