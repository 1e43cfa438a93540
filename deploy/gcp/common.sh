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

# req FLAG REST...: dies unless the flag's value (the first of REST) is there and not empty.
req() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then
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

# region_of ZONE: us-central1-a -> us-central1.
region_of() { printf '%s' "${1%-*}"; }
