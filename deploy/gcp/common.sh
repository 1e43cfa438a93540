# shellcheck shell=bash
# Shared by the GCP scripts (sourced, not run): messages, shell quoting, and `run`, which runs a
# gcloud command or, with --dry-run, prints it on one line, shell-quoted, for review or replay.

say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "${0##*/}" "$*" >&2
    exit 1
}

# quote WORD: WORD as one shell word (bare when it is made of safe characters only).
quote() {
    if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# quote_all WORD...: the words, quoted, separated by spaces.
quote_all() {
    local first=1 w
    for w in "$@"; do
        ((first)) || printf ' '
        first=0
        quote "$w"
    done
}

# The flags every script takes (parse_flags sets them).
project=
bucket=
dry_run=0
# run CMD...: runs CMD, or prints it with --dry-run.
run() {
    if ((dry_run)); then
        quote_all "$@"
        printf '\n'
    else
        say "+ $(quote_all "$@")"
        "$@"
    fi
}

# exists CMD...: whether a `gcloud ... describe` succeeds (never with --dry-run: a dry run
# prints every command, as for an empty project).
exists() {
    ((dry_run == 0)) && "$@" >/dev/null 2>&1
}

# need FLAG VALUE: FLAG's VALUE must not be empty.
need() {
    [ -n "$2" ] || die "$1 is required (see --help)"
}

# req FLAG REST...: dies unless the flag's value (the first of REST) is there, not empty and not
# the next flag.
req() {
    if [ $# -lt 2 ] || [ -z "$2" ] || [[ $2 == --* ]]; then
        die "$1 needs a value (see --help)"
    fi
}

# split_args ARGS...: prints ARGS NUL-separated with every `--flag=value` as `--flag` `value`,
# so that option loops handle one form (read back with mapfile -d '').
split_args() {
    local a
    for a in "$@"; do
        case $a in
            --*=*) printf '%s\0%s\0' "${a%%=*}" "${a#*=}" ;;
            *) printf '%s\0' "$a" ;;
        esac
    done
}

# usage: the script's leading comment block, unprefixed (its --help).
usage() {
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
}

# value FLAG REST...: FLAG takes the next word (dies if it is missing or empty); marks it used.
value() {
    req "$@"
    used=1
}

# parse_flags HANDLER ARGS...: reads ARGS (`--flag value` or `--flag=value`). The flags every
# script has (--project, --bucket, --dry-run, --help) are handled here; any other goes to
# `HANDLER FLAG REST...`, which sets its variable (calling `value` for a flag with a value) or
# returns 1 for an unknown flag.
# shellcheck disable=SC2034 # project and bucket are the calling script's variables
parse_flags() {
    local handler=$1 arg words
    shift
    mapfile -d '' words < <(split_args "$@")
    set -- "${words[@]+"${words[@]}"}"
    while [ $# -gt 0 ]; do
        arg=$1
        shift
        used=0
        case $arg in
            --project) value "$arg" "$@"; project=$1 ;;
            --bucket) value "$arg" "$@"; bucket=${1#gs://}; bucket=${bucket%/} ;;
            --dry-run) dry_run=1 ;;
            -h | --help) usage; exit 0 ;;
            *) "$handler" "$arg" "$@" || die "unknown argument $arg (see --help)" ;;
        esac
        shift "$used"
    done
}

# region_of ZONE: us-central1-a -> us-central1.
region_of() { printf '%s' "${1%-*}"; }
