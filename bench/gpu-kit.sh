#!/usr/bin/env bash
# Builds what a GPU session needs into .gpu/kit.tar.xz (ignored by git), on this machine:
#   - release binaries: segtrain-worker, segtrain-coordinator, segtrain, segtrain-devpg
#   - the GPU test binaries (worker tests cuda, torch_ext, collective), release, prebuilt
#   - PostgreSQL's server programs with their libraries (the GPU machine has none and cannot
#     install any), relocatable: initdb and postgres find share/ and lib/ relative to themselves
# All stripped and xz-compressed so the kit and the repository travel with the device tool's
# `run` (64 MiB in all). Then, on the GPU machine: `bash bench/gpu-session.sh checks|bench|extra`
# with `carry: [".gpu"]`.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
stage=$(mktemp -d -t segtrain-kit-XXXXXX)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/tests" "$stage/pg/lib" "$repo/.gpu"

cd "$repo"
cargo build --release --workspace --bins
for b in segtrain-worker segtrain-coordinator segtrain segtrain-devpg; do
    cp "$target/release/$b" "$stage/bin/"
done
# The test binaries' paths, from cargo's own report.
cargo test --release -p segtrain-worker --test cuda --test torch_ext --test collective --no-run \
    --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "$stage/tests/$name"; done
for t in cuda torch_ext collective; do
    [ -x "$stage/tests/$t" ] || { echo "gpu-kit: test binary $t was not built" >&2; exit 1; }
done
strip "$stage"/bin/* "$stage"/tests/*

# PostgreSQL: the four programs the test harness runs, the server's modules (no LLVM JIT),
# its share/ tree, the time zone data (a bare image may have none), and every library they
# load that is not glibc's.
pgroot=$(printf '%s\n' /usr/lib/postgresql/*/ | sort -V | tail -n 1)
pgroot=${pgroot%/}
pgver=$(basename "$pgroot")
mkdir -p "$stage/pg/usr/lib/postgresql/$pgver/bin" "$stage/pg/usr/lib/postgresql/$pgver/lib" \
    "$stage/pg/usr/share/postgresql" "$stage/zoneinfo"
for p in initdb postgres pg_isready createdb; do
    cp "$pgroot/bin/$p" "$stage/pg/usr/lib/postgresql/$pgver/bin/"
done
find "$pgroot/lib" -maxdepth 1 -name '*.so' ! -name 'llvmjit*' \
    -exec cp {} "$stage/pg/usr/lib/postgresql/$pgver/lib/" \;
cp -r "/usr/share/postgresql/$pgver" "$stage/pg/usr/share/postgresql/"
cp -r /usr/share/zoneinfo/. "$stage/zoneinfo/"
find "$stage/pg/usr/lib/postgresql/$pgver" -type f -print0 |
    xargs -0 ldd 2>/dev/null | awk '/=> \// {print $3}' | sort -u |
    grep -Ev '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" "$stage/pg/lib/"; done

tar -C "$stage" -cJf "$repo/.gpu/kit.tar.xz" .
du -h "$repo/.gpu/kit.tar.xz"
