#!/usr/bin/env bash
# Installs segtrain on a host (or stages it into DESTDIR for packaging): the binaries, the torch
# runtime the worker links, the systemd units, configuration skeletons under /etc/segtrain, the
# system users (`segtrain` runs the coordinator, `segtrain-worker` the worker daemons: each reads
# only its own configuration and secrets), and on a coordinator host a PostgreSQL database and
# role and a TLS certificate. Idempotent: a second run changes nothing that is already right, and never
# overwrites configuration. See docs/operations.md.
#
#   deploy/install.sh [--role coordinator|worker|all] [--prefix DIR] [--build-dir DIR]
#                     [--torch-dir DIR] [--unit-dir DIR] [--bin-links DIR|none]
#                     [--database-url URL] [--tls-host NAME]... [--no-certs] [--link] [--start]
#   deploy/install.sh --uninstall [--purge] [--prefix DIR] [--unit-dir DIR] [--bin-links DIR]
#
#   --role ROLE        coordinator: segtrain-coordinator, the CLI, its unit, coordinator.env,
#                      PostgreSQL and certificates; worker: segtrain-worker, the torch runtime,
#                      the worker units, worker.env; all (default): both.
#   --prefix DIR       where binaries and libraries go (default /opt/segtrain; SEGTRAIN_PREFIX).
#   --build-dir DIR    where the built binaries are (default target/release of this checkout, or
#                      $CARGO_TARGET_DIR/release; SEGTRAIN_BUILD_DIR).
#   --torch-dir DIR    the torch package whose lib/ the worker links (default: SEGTRAIN_TORCH_DIR,
#                      else the checkout's .torch, else the venv of deploy/setup.sh). Its lib/*.so
#                      and the nvidia/*/lib libraries next to it are installed under PREFIX/lib.
#   --unit-dir DIR     systemd units (default /etc/systemd/system; packages: /lib/systemd/system).
#   --bin-links DIR    links to the commands in DIR (default /usr/local/bin; `none`: no links).
#   --database-url URL coordinator: use this PostgreSQL (Cloud SQL, another host) instead of a
#                      local server; written into a new coordinator.env.
#   --tls-host NAME    coordinator: a name or address for the server certificate (repeatable;
#                      default: the hostname, its FQDN, its addresses, localhost, 127.0.0.1).
#   --coordinator-url URL  worker: SEGTRAIN_COORDINATOR of a new worker.env (default with --role
#                      all: https://localhost:50051, and the CA and a worker token are set up).
#   --no-certs         coordinator: do not make a certificate.
#   --link             hard-link binaries and libraries instead of copying them where the file
#                      system allows (packaging on the build host, tests); never modifies them.
#   --start            enable and start the role's units (segtrain-coordinator.service,
#                      segtrain-workers.target); otherwise only systemctl daemon-reload.
#   --uninstall        stop and remove what install put there; configuration is kept unless
#                      unchanged from the skeleton, the database always.
#   --purge            with --uninstall: also /etc/segtrain, /var/lib/segtrain and the users.
#
# DESTDIR=DIR stages everything under DIR and touches nothing outside it: no user, no systemctl,
# no PostgreSQL, no certificates, no ownership changes. Without DESTDIR it must run as root.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEFAULT_PREFIX=/opt/segtrain
SYSCONF=/etc/segtrain
STATE=/var/lib/segtrain
USER_NAME=segtrain
# The worker daemons' user: they run code a job's owner brought, so they must not read the
# coordinator's database URL or TLS key (docs/security.md).
WORKER_USER=segtrain-worker
TORCH_VERSION=2.11.0

role=all
prefix=${SEGTRAIN_PREFIX:-$DEFAULT_PREFIX}
build_dir=${SEGTRAIN_BUILD_DIR:-}
torch_dir=${SEGTRAIN_TORCH_DIR:-}
unit_dir=/etc/systemd/system
bin_links=/usr/local/bin
database_url=
coordinator_url=
tls_hosts=()
certs=1
link=0
start=0
uninstall=0
purge=0
destdir=${DESTDIR:-}

say() { printf 'install: %s\n' "$*"; }
warn() { printf 'install: warning: %s\n' "$*" >&2; }
die() {
    printf 'install: error: %s\n' "$*" >&2
    exit 1
}
usage() { sed -n '2,40p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

need_value() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then
        die "$1 needs a value (see --help)"
    fi
}
# `--flag=value` as `--flag value`, so that the loop reads one form.
words=()
for a in "$@"; do
    case $a in
        --*=*) words+=("${a%%=*}" "${a#*=}") ;;
        *) words+=("$a") ;;
    esac
done
set -- "${words[@]+"${words[@]}"}"
while [ $# -gt 0 ]; do
    case $1 in
        --role) need_value "$@"; role=$2; shift 2 ;;
        --prefix) need_value "$@"; prefix=$2; shift 2 ;;
        --build-dir) need_value "$@"; build_dir=$2; shift 2 ;;
        --torch-dir) need_value "$@"; torch_dir=$2; shift 2 ;;
        --unit-dir) need_value "$@"; unit_dir=$2; shift 2 ;;
        --bin-links) need_value "$@"; bin_links=$2; shift 2 ;;
        --database-url) need_value "$@"; database_url=$2; shift 2 ;;
        --coordinator-url) need_value "$@"; coordinator_url=$2; shift 2 ;;
        --tls-host) need_value "$@"; tls_hosts+=("$2"); shift 2 ;;
        --no-certs) certs=0; shift ;;
        --link) link=1; shift ;;
        --start) start=1; shift ;;
        --uninstall) uninstall=1; shift ;;
        --purge) purge=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

case $role in
    coordinator | worker | all) ;;
    *) die "--role: must be coordinator, worker or all, got $role" ;;
esac
for d in "$prefix" "$unit_dir"; do
    case $d in
        /*) ;;
        *) die "$d: --prefix and --unit-dir must be absolute paths" ;;
    esac
done
prefix=${prefix%/}
[ "$prefix" != "" ] || die "--prefix: / is not a valid prefix"
if [ "$bin_links" != none ]; then
    case $bin_links in
        /*) ;;
        *) die "--bin-links: must be an absolute path or none, got $bin_links" ;;
    esac
fi
if [ -n "$destdir" ]; then
    case $destdir in
        /*) ;;
        *) destdir=$(pwd)/$destdir ;;
    esac
    destdir=${destdir%/}
fi
((purge == 0 || uninstall == 1)) || die "--purge goes with --uninstall"

coordinator=0
worker=0
case $role in
    coordinator) coordinator=1 ;;
    worker) worker=1 ;;
    all) coordinator=1 worker=1 ;;
esac
if ((coordinator && worker)) && [ -z "$coordinator_url" ]; then
    coordinator_url=https://localhost:50051
fi

# Whether we act on the live system (not a DESTDIR stage).
live() { [ -z "$destdir" ]; }
# Whether systemd runs here (containers and build hosts often have none).
have_systemd() { live && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }
if live && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo), or set DESTDIR=DIR to stage the installation into DIR"
fi

manifest=$prefix/share/segtrain/install-manifest
# Paths this run installed (live paths, without DESTDIR), for the manifest.
installed=()
changed_units=0

# --- helpers -------------------------------------------------------------------------------------

# mkdir -p under DESTDIR.
mkdirs() { mkdir -p "$destdir$1"; }

# same SRC DST QUICK: whether DST (a live path) already holds SRC: the same file, or the same
# bytes; with QUICK=1 (big libraries), the same size and modification time.
same() {
    local src=$1 dst=$destdir$2
    [ -e "$dst" ] || return 1
    [ "$src" -ef "$dst" ] && return 0
    if [ "$3" = 1 ]; then
        [ "$(stat -L -c '%s %Y' "$src")" = "$(stat -c '%s %Y' "$dst")" ]
    else
        cmp -s "$src" "$dst"
    fi
}

# put SRC DST MODE [QUICK]: installs SRC at DST (live path) through a temporary file and a rename,
# so a running program keeps its old file. With --link, a hard link where possible (its mode is
# left alone: it is the source file). Returns 1 when DST was already right.
put() {
    local src=$1 dst=$2 mode=$3 tmp
    installed+=("$dst")
    if same "$src" "$dst" "${4:-0}"; then
        return 1
    fi
    mkdirs "$(dirname "$dst")"
    tmp=$destdir$(dirname "$dst")/.$(basename "$dst").tmp.$$
    rm -f "$tmp"
    if ((link)) && ln "$src" "$tmp" 2>/dev/null; then
        :
    else
        cp --preserve=timestamps "$src" "$tmp"
        chmod "$mode" "$tmp"
    fi
    mv -f "$tmp" "$destdir$dst"
    return 0
}

# put_text DST MODE: installs stdin as DST unless it already holds exactly that.
put_text() {
    local dst=$1 mode=$2 tmp
    installed+=("$dst")
    mkdirs "$(dirname "$dst")"
    tmp=$destdir$(dirname "$dst")/.$(basename "$dst").tmp.$$
    cat >"$tmp"
    if [ -f "$destdir$dst" ] && cmp -s "$tmp" "$destdir$dst"; then
        rm -f "$tmp"
        return 1
    fi
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$destdir$dst"
    return 0
}

# put_link DST TARGET: a symbolic link.
put_link() {
    local dst=$1 target=$2
    installed+=("$dst")
    if [ -L "$destdir$dst" ] && [ "$(readlink "$destdir$dst")" = "$target" ]; then
        return 1
    fi
    if [ -e "$destdir$dst" ] && [ ! -L "$destdir$dst" ]; then
        warn "$dst exists and is not a link; left alone"
        return 1
    fi
    mkdirs "$(dirname "$dst")"
    ln -sfn "$target" "$destdir$dst"
    return 0
}

# install_file SRC DST MODE: put, saying so when something changed.
install_file() {
    if put "$1" "$2" "$3"; then
        say "installed $2"
    fi
}

# The units and scripts name /opt/segtrain; another --prefix is written into them.
with_prefix() {
    local line
    while IFS= read -r line || [ -n "$line" ]; do
        printf '%s\n' "${line//"$DEFAULT_PREFIX"/"$prefix"}"
    done <"$1"
}

# --- uninstall -----------------------------------------------------------------------------------

if ((uninstall)); then
    if have_systemd; then
        say "stopping and disabling the segtrain units"
        systemctl disable --now segtrain-workers.target segtrain-worker-gpus.service \
            segtrain-coordinator.service >/dev/null 2>&1 || true
        mapfile -t running < <(systemctl list-units --all --plain --no-legend 'segtrain-worker@*' | awk '{print $1}')
        if ((${#running[@]})); then
            systemctl disable --now "${running[@]}" >/dev/null 2>&1 || true
        fi
    fi
    removed=0
    if [ -f "$destdir$manifest" ]; then
        dirs=()
        while IFS=' ' read -r kind path sum; do
            [ -n "$path" ] || continue
            case $kind in
                file)
                    if [ -e "$destdir$path" ] || [ -L "$destdir$path" ]; then
                        rm -f "$destdir$path"
                        removed=$((removed + 1))
                    fi
                    dirs+=("$(dirname "$path")")
                    ;;
                config)
                    # Configuration goes only when nobody changed it (or with --purge).
                    if [ -f "$destdir$path" ]; then
                        if ((purge)) || [ "$(sha256sum <"$destdir$path" | cut -d' ' -f1)" = "$sum" ]; then
                            rm -f "$destdir$path"
                            removed=$((removed + 1))
                        else
                            say "kept $path (changed since install; --purge removes it)"
                        fi
                    fi
                    dirs+=("$(dirname "$path")")
                    ;;
            esac
        done <"$destdir$manifest"
        rm -f "$destdir$manifest"
        dirs+=("$(dirname "$manifest")")
        # Remove the directories this left empty, deepest first, never above the prefix or the
        # shared system directories.
        mapfile -t dirs < <(printf '%s\n' "${dirs[@]}" | sort -u -r)
        for d in "${dirs[@]}"; do
            while [ "$d" != / ] && [ "$d" != "$unit_dir" ] && [ "$d" != "$bin_links" ] &&
                [ "$d" != /etc ] && [ "$d" != /opt ] && [ "$d" != /usr ] && [ "$d" != /usr/local ] &&
                [ "$d" != "$(dirname "$prefix")" ] && [ -d "$destdir$d" ] &&
                rmdir "$destdir$d" 2>/dev/null; do
                d=$(dirname "$d")
            done
        done
        say "removed $removed files"
    else
        warn "no $manifest: nothing installed under --prefix $prefix"
    fi
    if ((purge)); then
        rm -rf "${destdir:?}$SYSCONF" "${destdir:?}$STATE"
        say "removed $SYSCONF and $STATE"
        for u in "$USER_NAME" "$WORKER_USER"; do
            if live && getent passwd "$u" >/dev/null; then
                userdel "$u" || warn "could not remove the user $u"
            fi
        done
    fi
    if have_systemd; then
        systemctl daemon-reload
    fi
    if live && ((coordinator)) && [ -z "$database_url" ] && command -v psql >/dev/null 2>&1; then
        say "the PostgreSQL database and role segtrain were kept; drop them with:"
        say "  runuser -u postgres -- dropdb segtrain && runuser -u postgres -- dropuser segtrain"
    fi
    exit 0
fi

# --- what to install from ------------------------------------------------------------------------

if [ -z "$build_dir" ]; then
    build_dir=${CARGO_TARGET_DIR:-$repo/target}/release
fi
bins=(segtrain)
((coordinator)) && bins+=(segtrain-coordinator)
((worker)) && bins+=(segtrain-worker)
for b in "${bins[@]}"; do
    [ -x "$build_dir/$b" ] || die "$build_dir/$b not found: build with \`cargo build --release --workspace --bins\`, or name the build with --build-dir (e.g. target/debug)"
done

if ((worker)); then
    if [ -z "$torch_dir" ]; then
        if [ -e "$repo/.torch/lib/libtorch_cpu.so" ]; then
            torch_dir=$repo/.torch
        else
            venv=${SEGTRAIN_VENV:-${HOME:-/root}/.cache/segtrain/torch-${TORCH_VERSION}-venv}
            for d in "$venv"/lib/python3*/site-packages/torch; do
                [ -e "$d/lib/libtorch_cpu.so" ] && torch_dir=$d
            done
        fi
    fi
    if [ -z "$torch_dir" ] || [ ! -e "$torch_dir/lib/libtorch_cpu.so" ]; then
        die "no libtorch found${torch_dir:+ in $torch_dir}: run \`make setup\`, or pass --torch-dir .../site-packages/torch (pip install torch==$TORCH_VERSION)"
    fi
    torch_dir=$(cd "$torch_dir" && pwd -P)
fi

# --- the users -----------------------------------------------------------------------------------

# user NAME COMMENT: a system user (and its group) unless it exists.
user() {
    if live && ! getent passwd "$1" >/dev/null; then
        useradd --system --user-group --home-dir "$STATE" --no-create-home \
            --shell /usr/sbin/nologin --comment "$2" "$1"
        say "created the system user $1"
    fi
}
((coordinator)) && user "$USER_NAME" "segtrain coordinator"
((worker)) && user "$WORKER_USER" "segtrain worker daemons"

# --- binaries ------------------------------------------------------------------------------------

for b in "${bins[@]}"; do
    install_file "$build_dir/$b" "$prefix/bin/$b" 0755
done

# --- the torch runtime (worker) ------------------------------------------------------------------

if ((worker)); then
    n=0
    new=0
    site=$(dirname "$torch_dir")
    # libtorch itself (not its Python binding), then the NVIDIA libraries it finds through its
    # RPATH ($ORIGIN/../../nvidia/<name>/lib): the same layout under PREFIX/lib.
    libs=()
    for f in "$torch_dir"/lib/*.so*; do
        case $(basename "$f") in
            libtorch_python.so) ;;
            *) libs+=("$f") ;;
        esac
    done
    for f in "$site"/nvidia/*/lib/*.so*; do
        [ -e "$f" ] && libs+=("$f")
    done
    for f in "${libs[@]}"; do
        rel=${f#"$site"/}
        dst=$prefix/lib/$rel
        n=$((n + 1))
        if [ -L "$f" ]; then
            if put_link "$dst" "$(readlink "$f")"; then
                new=$((new + 1))
            fi
        elif put "$f" "$dst" 0644 1; then
            new=$((new + 1))
        fi
    done
    say "torch runtime: $n libraries from $site ($new new or changed) in $prefix/lib"
    if put_text "$prefix/libexec/segtrain-workers-enable" 0755 < <(with_prefix "$repo/deploy/libexec/segtrain-workers-enable"); then
        say "installed $prefix/libexec/segtrain-workers-enable"
    fi
fi

# --- documentation -------------------------------------------------------------------------------

install_file "$repo/docs/operations.md" "$prefix/share/doc/segtrain/operations.md" 0644

# --- systemd units -------------------------------------------------------------------------------

units=()
((coordinator)) && units+=(segtrain-coordinator.service)
((worker)) && units+=(segtrain-worker@.service segtrain-workers.target segtrain-worker-gpus.service)
for u in "${units[@]}"; do
    if put_text "$unit_dir/$u" 0644 < <(with_prefix "$repo/deploy/systemd/$u"); then
        say "installed $unit_dir/$u"
        changed_units=1
    fi
done

# --- commands on the PATH ------------------------------------------------------------------------

if [ "$bin_links" != none ]; then
    links=(segtrain)
    ((coordinator)) && links+=(segtrain-coordinator)
    for b in "${links[@]}"; do
        if put_link "$bin_links/$b" "$prefix/bin/$b"; then
            say "linked $bin_links/$b"
        fi
    done
    # segtrain-worker by hand (doctor, train, predict) with the installed torch runtime.
    if ((worker)) && put_text "$bin_links/segtrain-worker" 0755 <<EOF; then
#!/bin/sh
# Installed by segtrain's deploy/install.sh: segtrain-worker with the torch runtime it installed.
LD_LIBRARY_PATH=$prefix/lib/torch/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
SEGTRAIN_NCCL_LIBRARY=\${SEGTRAIN_NCCL_LIBRARY:-$prefix/lib/nvidia/nccl/lib/libnccl.so.2}
export LD_LIBRARY_PATH SEGTRAIN_NCCL_LIBRARY
exec $prefix/bin/segtrain-worker "\$@"
EOF
        say "installed $bin_links/segtrain-worker"
    fi
fi

# --- configuration -------------------------------------------------------------------------------

configs=()
# config NAME GROUP: /etc/segtrain/NAME from deploy/config/NAME (0640, readable by GROUP), only
# when it does not exist yet.
config() {
    local name=$1 group=$2 dst=$SYSCONF/$1 tmp line
    mkdirs "$SYSCONF"
    tmp=$destdir$SYSCONF/.$name.tmp.$$
    while IFS= read -r line || [ -n "$line" ]; do
        if [ -n "$database_url" ] && [[ $line == SEGTRAIN_DATABASE_URL=* ]]; then
            line="SEGTRAIN_DATABASE_URL=$database_url"
        fi
        if [ -n "$coordinator_url" ] && [[ $line == SEGTRAIN_COORDINATOR=* ]]; then
            line="SEGTRAIN_COORDINATOR=$coordinator_url"
        fi
        printf '%s\n' "$line"
    done <"$repo/deploy/config/$name" >"$tmp"
    configs+=("config $dst $(sha256sum <"$tmp" | cut -d' ' -f1)")
    if [ -e "$destdir$dst" ]; then
        rm -f "$tmp"
        # Keep the checksum of what install wrote the first time, so --uninstall can tell.
        local old
        old=$(awk -v p="$dst" '$1 == "config" && $2 == p {print $3}' "$destdir$manifest" 2>/dev/null || true)
        [ -n "$old" ] && configs[${#configs[@]} - 1]="config $dst $old"
        say "kept $dst (exists)"
        return
    fi
    chmod 0640 "$tmp"
    mv "$tmp" "$destdir$dst"
    if live; then
        chgrp "$group" "$destdir$dst"
    fi
    say "wrote $dst"
}
((coordinator)) && config coordinator.env "$USER_NAME"
((worker)) && config worker.env "$WORKER_USER"
if live; then
    # Both users pass through it; each file is readable by its own service's group only.
    chgrp root "$SYSCONF"
    chmod 0755 "$SYSCONF"
fi

# --- PostgreSQL and certificates (coordinator, live only) ----------------------------------------

if ((coordinator)) && live; then
    if [ -z "$database_url" ]; then
        if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
            say "installing PostgreSQL"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        fi
        if have_systemd; then
            systemctl enable --now postgresql >/dev/null
        fi
        for _ in $(seq 60); do
            runuser -u postgres -- pg_isready -q && break
            sleep 1
        done
        runuser -u postgres -- pg_isready -q || die "the local PostgreSQL does not accept connections"
        psql_q() { runuser -u postgres -- psql -X -tA -c "$1"; }
        if [ "$(psql_q "SELECT 1 FROM pg_roles WHERE rolname = '$USER_NAME'")" != 1 ]; then
            runuser -u postgres -- createuser "$USER_NAME"
            say "created the PostgreSQL role $USER_NAME"
        fi
        if [ "$(psql_q "SELECT 1 FROM pg_database WHERE datname = 'segtrain'")" != 1 ]; then
            runuser -u postgres -- createdb --owner "$USER_NAME" segtrain
            say "created the PostgreSQL database segtrain"
        fi
    fi
    if ((certs)) && [ ! -e "$SYSCONF/tls/server.pem" ]; then
        if ((${#tls_hosts[@]} == 0)); then
            tls_hosts=("$(hostname)" localhost 127.0.0.1)
            fqdn=$(hostname -f 2>/dev/null || true)
            [ -n "$fqdn" ] && [ "$fqdn" != "$(hostname)" ] && tls_hosts+=("$fqdn")
            for ip in $(hostname -I 2>/dev/null || true); do
                tls_hosts+=("$ip")
            done
        fi
        host_args=()
        for h in "${tls_hosts[@]}"; do
            host_args+=(--host "$h")
        done
        "$prefix/bin/segtrain-coordinator" certs --out "$SYSCONF/tls" "${host_args[@]}" >/dev/null
        chgrp "$USER_NAME" "$SYSCONF/tls" "$SYSCONF/tls/server-key.pem"
        chmod 0750 "$SYSCONF/tls"
        chmod 0640 "$SYSCONF/tls/server-key.pem"
        say "made a private CA and a server certificate in $SYSCONF/tls for ${tls_hosts[*]}"
        say "  clients and workers need $SYSCONF/tls/ca.pem; keep ca-key.pem offline"
    fi
fi

# --- one host with both roles: its workers trust the local CA and get a worker token ------------

if ((coordinator && worker)) && live; then
    if [ ! -e "$SYSCONF/ca.pem" ] && [ -e "$SYSCONF/tls/ca.pem" ]; then
        cp "$SYSCONF/tls/ca.pem" "$SYSCONF/ca.pem"
        chmod 0644 "$SYSCONF/ca.pem"
        say "wrote $SYSCONF/ca.pem (the workers' SEGTRAIN_CA)"
    fi
    if [ ! -e "$SYSCONF/worker.token" ]; then
        url=$(sed -n 's/^SEGTRAIN_DATABASE_URL=//p' "$SYSCONF/coordinator.env" | tail -n 1)
        url=${url#[\"\']}
        url=${url%[\"\']}
        if [ -n "$url" ] && token=$(runuser -u "$USER_NAME" -- "$prefix/bin/segtrain-coordinator" \
            token create --database-url "$url" --role worker --name "$(hostname)-workers" 2>/dev/null); then
            (umask 027 && printf '%s\n' "$token" >"$SYSCONF/worker.token")
            chgrp "$WORKER_USER" "$SYSCONF/worker.token"
            say "wrote $SYSCONF/worker.token (a worker token for this host's daemons)"
        else
            warn "could not create a worker token (is the database reachable as $USER_NAME?); create one with: segtrain-coordinator token create --database-url URL --role worker --name $(hostname) > $SYSCONF/worker.token"
        fi
    fi
fi

# --- the manifest --------------------------------------------------------------------------------

mkdirs "$(dirname "$manifest")"
{
    # What this run installed, then what earlier runs did (another --role, say): configuration
    # entries of this run first, so the first line of each path wins.
    for p in "${installed[@]}"; do
        printf 'file %s\n' "$p"
    done
    printf 'file %s\n' "$manifest"
    for c in "${configs[@]+"${configs[@]}"}"; do
        printf '%s\n' "$c"
    done
    if [ -f "$destdir$manifest" ]; then
        cat "$destdir$manifest"
    fi
} | awk '!seen[$1 " " $2]++' | sort >"$destdir$manifest.tmp.$$"
if cmp -s "$destdir$manifest.tmp.$$" "$destdir$manifest"; then
    rm -f "$destdir$manifest.tmp.$$"
else
    mv -f "$destdir$manifest.tmp.$$" "$destdir$manifest"
fi

# --- systemd -------------------------------------------------------------------------------------

if have_systemd; then
    systemctl daemon-reload
    if ((start)); then
        ((coordinator)) && systemctl enable --now segtrain-coordinator.service
        ((worker)) && systemctl enable --now segtrain-workers.target
    elif ((changed_units)); then
        say "units changed; running services keep their old binaries until restarted (drain first: docs/operations.md)"
    fi
elif live; then
    warn "systemd is not running here: units installed but not loaded"
fi

say "done: $role in $prefix${destdir:+ (staged under $destdir)}"
if ((start == 0)) && live; then
    ((coordinator)) && say "next: edit $SYSCONF/coordinator.env, then systemctl enable --now segtrain-coordinator"
    ((worker)) && say "next: edit $SYSCONF/worker.env (coordinator, ca.pem, worker token), then systemctl enable --now segtrain-workers.target"
fi
exit 0
