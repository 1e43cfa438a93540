#!/usr/bin/env bash
# Lints the deployment files (`make lint-deploy`, part of `make test`):
#
#   1. shellcheck on every shell script under deploy/ and bench/ and on .ci/run;
#   2. deploy/install.sh into a temporary DESTDIR (hard links: quick), then
#      `systemd-analyze verify` on every unit it installed (the worker template as instances
#      segtrain-worker@0 and segtrain-worker@cpu), with the install prefix and /etc/segtrain
#      rewritten to the staged tree so that every ExecStart= binary exists. verify needs no
#      running systemd; any message it prints about our units (an unknown key, a bad value, a
#      missing binary) fails the lint.
#
# Environment: SEGTRAIN_BUILD_DIR (default $CARGO_TARGET_DIR/debug or target/debug: the binaries
# `cargo build --workspace --bins` made).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
say() { printf 'lint-deploy: %s\n' "$*"; }
die() {
    printf 'lint-deploy: error: %s\n' "$*" >&2
    exit 1
}

command -v shellcheck >/dev/null 2>&1 || die "shellcheck not found: run \`make setup\` (or apt-get install shellcheck)"
command -v systemd-analyze >/dev/null 2>&1 || die "systemd-analyze not found (Debian package systemd)"

# --- 1. shellcheck -------------------------------------------------------------------------------
scripts=(.ci/run)
while IFS= read -r -d '' f; do
    case $f in
        *.sh) scripts+=("$f") ;;
        *) if head -n 1 "$f" | grep -Eq '^#!.*\b(ba)?sh\b'; then scripts+=("$f"); fi ;;
    esac
done < <(find deploy bench -type f ! -path "*/__pycache__/*" -print0 | sort -z)
shellcheck --external-sources "${scripts[@]}"
say "shellcheck: ${#scripts[@]} scripts clean"

# --- 2. systemd-analyze verify on a staged installation ------------------------------------------
build_dir=${SEGTRAIN_BUILD_DIR:-${CARGO_TARGET_DIR:-$repo/target}/debug}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
DESTDIR=$tmp/root bash deploy/install.sh --role all --build-dir "$build_dir" --link >"$tmp/install.log" 2>&1 ||
    die "install.sh into a DESTDIR failed:
$(cat "$tmp/install.log")"

mkdir -p "$tmp/units"
units=()
for unit in "$tmp"/root/etc/systemd/system/*; do
    name=$(basename "$unit")
    targets=("$name")
    if [ "$name" = segtrain-worker@.service ]; then
        targets=(segtrain-worker@0.service segtrain-worker@cpu.service)
    fi
    for t in "${targets[@]}"; do
        sed -e "s|/opt/segtrain|$tmp/root/opt/segtrain|g" -e "s|/etc/segtrain|$tmp/root/etc/segtrain|g" \
            "$unit" >"$tmp/units/$t"
        units+=("$tmp/units/$t")
    done
done
((${#units[@]} >= 5)) || die "expected at least 5 units in the staged tree, found ${#units[@]}"
status=0
out=$(cd "$tmp/units" && SYSTEMD_LOG_LEVEL=notice SYSTEMD_LOG_COLOR=0 systemd-analyze verify "${units[@]}" 2>&1) || status=$?
# Messages about other units of this host (their own quirks) are not ours to fix.
ours=$(printf '%s\n' "$out" | grep -E 'segtrain' || true)
if ((status != 0)) || [ -n "$ours" ]; then
    printf '%s\n' "$out" >&2
    die "systemd-analyze verify failed (exit $status)"
fi
say "systemd-analyze verify: ${#units[@]} units clean"
