#!/bin/sh
# The system tools tessera's set-up needs on Debian/Ubuntu, installed only where missing (then `make install`):
#   make, g++ (builds the native CPU attention kernel), python3 with a working `python3 -m venv` (python3-venv),
#   node and npm (buf for `make lint` and `buf curl`, the Node client test), pgrep (procps; the CLI tests).
# `apt-get update` runs only when something has to be installed; sudo is used when not root and sudo exists.
#
#   scripts/install-system-deps.sh            install what is missing
#   scripts/install-system-deps.sh --dry-run  only say what it would install (changes nothing)
set -eu

me="install-system-deps"
dry_run=0
for arg in "$@"; do
    case "$arg" in
        -n|--dry-run) dry_run=1 ;;
        -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "$me: unknown argument '$arg' (try --dry-run or --help)" >&2; exit 2 ;;
    esac
done

say() { echo "$me: $*"; }
have() { command -v "$1" >/dev/null 2>&1; }

packages=""     # Debian packages to install
node_step=""    # nodejs when node and npm are both missing (npm follows if that nodejs lacks it)
want() { packages="$packages $1"; say "$2: missing -> $1"; }
found() { say "$1: found ($2)"; }

need() {  # need TOOL PACKAGE: PACKAGE unless TOOL is on the PATH
    if have "$1"; then found "$1" "$(command -v "$1")"; else want "$2" "$1"; fi
}

need make make
need g++ g++
if ! have python3; then
    want "python3 python3-venv" python3
elif ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    say "python3: found $(python3 -V 2>&1), but tessera needs >= 3.10: install a newer one and run" \
        "'make PYTHON=/path/to/python3.x install'"
elif python3 -c 'import ensurepip, venv' 2>/dev/null; then
    found "python3 -m venv" "$(python3 -V 2>&1)"
else
    python=$(command -v python3)
    venv_package=$(python3 -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')
    case "$(readlink -f "$python")" in
        /usr/bin/*) want "$venv_package" "python3 -m venv (no ensurepip in $python)" ;;
        *) say "python3 -m venv: $python has no ensurepip and is not Debian's python: reinstall it with" \
               "ensurepip, or run 'make PYTHON=/usr/bin/python3 install' after installing python3-venv" ;;
    esac
fi
need pgrep procps

if have npm; then
    found npm "$(command -v npm)"
elif ! have node && ! have nodejs; then
    # One package first: NodeSource's nodejs brings its own npm (and conflicts with Debian's), Debian's does not.
    node_step=nodejs
    say "node, npm: missing -> nodejs, then npm if that nodejs did not bring it"
else
    node=$(readlink -f "$(command -v node || command -v nodejs)")
    owner=$(dpkg -S "$node" 2>/dev/null | cut -d: -f1 || true)
    node_version=$(dpkg-query -W -f '${Version}' nodejs 2>/dev/null || true)
    if [ "$owner" != nodejs ]; then
        say "npm: missing, and node ($node) is not from an apt-installed nodejs package: not installing Debian's npm" \
            "over it. Install npm the way that node was installed; until then 'make install' skips buf" \
            "and the Node client test is skipped"
    else
        case "$node_version" in
            *nodesource*)
                say "npm: missing, and nodejs $node_version is NodeSource's (which conflicts with Debian's npm):" \
                    "reinstall NodeSource's nodejs, which includes npm; until then 'make install' skips buf and" \
                    "the Node client test is skipped" ;;
            *) want npm "npm (for Debian's nodejs $node_version)" ;;
        esac
    fi
fi

if [ -z "$packages" ] && [ -z "$node_step" ]; then
    say "nothing to install"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif have sudo; then
    sudo="sudo"
else
    say "not root and no sudo: as root, install:$packages ${node_step:+$node_step}" >&2
    exit 1
fi
if ! have apt-get; then
    say "no apt-get (not Debian/Ubuntu?): install these with your package manager:$packages ${node_step:+$node_step}" >&2
    exit 1
fi

run() {
    if [ "$dry_run" -eq 1 ]; then
        say "would run: $*"
    else
        say "running: $*"
        "$@"
    fi
}
apt_install() {
    # shellcheck disable=SC2086  # $sudo is empty or one word
    run $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

# shellcheck disable=SC2086
run $sudo apt-get update
# shellcheck disable=SC2086  # one word per package
[ -z "$packages" ] || apt_install $packages
if [ "$node_step" = nodejs ]; then
    apt_install nodejs
    if [ "$dry_run" -eq 1 ]; then
        say "would then run, if that nodejs has no npm:" \
            "${sudo:+$sudo }env DEBIAN_FRONTEND=noninteractive apt-get install -y npm"
    elif ! have npm; then
        apt_install npm
    fi
fi

if [ "$dry_run" -eq 0 ]; then
    missing=""
    for tool in make g++ npm; do have "$tool" || missing="$missing $tool"; done
    [ -z "$missing" ] || say "still missing:$missing"
    say "done; next: make install"
fi
