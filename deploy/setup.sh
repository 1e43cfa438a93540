#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine to build, test and demo segtrain. Idempotent: every step checks
# first and does nothing when its result is already there.
#
#   1. system packages: PostgreSQL server binaries (tests start throwaway clusters from them), a C/C++
#      toolchain (torch-sys and the libtorch shim), Python venv support, shellcheck and
#      systemd-analyze (`make lint-deploy`);
#   2. a Python venv OUTSIDE the checkout holding PyPI torch==2.11.0, whose libtorch tch 0.24 links
#      (reused when present and correct; ~5 GB with the nvidia-* wheels libtorch needs even on CPU),
#      and tensorboard (the export test reads event files back with it);
#   3. `.torch` in the checkout -> that venv's torch package (.cargo/config.toml points LIBTORCH here),
#      and web/node_modules from web/package-lock.json (npm ci), with nodejs, npm and chromium;
#   4. builds the workspace.
#
# Environment: SEGTRAIN_VENV (default ~/.cache/segtrain/torch-2.11.0-venv), SEGTRAIN_SKIP_BUILD=1.
set -euo pipefail

TORCH_VERSION=2.11.0
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${SEGTRAIN_VENV:-${HOME:-/root}/.cache/segtrain/torch-${TORCH_VERSION}-venv}

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# --- 1. system packages --------------------------------------------------------------------------
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql postgresql-contrib)
command -v pg_isready >/dev/null 2>&1 || need+=(postgresql-client)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
# `ip netns` for the network-partition test (tests/tests/partition.rs).
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# The text font of `segtrain plot` PNGs.
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
command -v python3 >/dev/null 2>&1 || need+=(python3)
# The dashboard: its npm packages (uPlot, embedded at build; playwright-core for the browser
# test) and the browser the test drives.
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
[ -x /usr/bin/chromium ] || need+=(chromium)
# `make lint-deploy`: shellcheck on the deploy scripts (systemd-analyze comes with systemd).
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    need+=(python3-venv)
fi
if ((${#need[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        die "missing packages: ${need[*]}; install them with: sudo apt-get install -y ${need[*]}"
    fi
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d keeps the package from starting a system-wide cluster we do not use.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust stable with rustup (https://rustup.rs)"

# --- 2. the torch venv ---------------------------------------------------------------------------
torch_ok() {
    "$venv/bin/python" - "$TORCH_VERSION" <<'PY' >/dev/null 2>&1
import sys, torch, pathlib
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
lib = pathlib.Path(torch.__file__).parent / "lib"
assert (lib / "libtorch_cpu.so").exists() and (lib / "libtorch_cuda.so").exists()
PY
}
if [ -x "$venv/bin/python" ] && torch_ok; then
    say "torch ${TORCH_VERSION} venv present: $venv"
else
    say "creating $venv with torch==${TORCH_VERSION} (a few GB; once per machine)"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==${TORCH_VERSION}"
    torch_ok || die "torch ${TORCH_VERSION} did not install correctly into $venv"
fi
# The TensorBoard event-file reader the export test reads `segtrain export tensorboard` back with.
TENSORBOARD_VERSION=2.20.0
if ! "$venv/bin/python" -c "import sys, tensorboard; sys.exit(tensorboard.__version__ != '$TENSORBOARD_VERSION')" >/dev/null 2>&1; then
    say "installing tensorboard==${TENSORBOARD_VERSION} into $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "tensorboard==${TENSORBOARD_VERSION}"
fi
torch_dir=$("$venv/bin/python" -W ignore -c 'import torch, pathlib; print(pathlib.Path(torch.__file__).parent)' 2>/dev/null)

# --- 2b. the dashboard's npm packages, exactly as web/package-lock.json pins them ------------------
if [ ! -e "$repo/web/node_modules/.package-lock.json" ] \
    || [ "$repo/web/package-lock.json" -nt "$repo/web/node_modules/.package-lock.json" ]; then
    say "installing the dashboard's npm packages (npm ci in web/)"
    (cd "$repo/web" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

# --- 3. link it into the checkout ----------------------------------------------------------------
if [ "$(readlink "$repo/.torch" 2>/dev/null || true)" != "$torch_dir" ]; then
    ln -sfn "$torch_dir" "$repo/.torch"
    say "linked .torch -> $torch_dir"
fi

# --- 4. build ------------------------------------------------------------------------------------
if [ "${SEGTRAIN_SKIP_BUILD:-0}" != 1 ]; then
    say "building the workspace"
    (cd "$repo" && cargo build --workspace --bins --quiet)
fi
say "ready"
