#!/usr/bin/env bash
# Install relayd from the repository this script lives in: a venv under the prefix, the
# /usr/bin/relayd link, the systemd units and (only if absent) the config file.
#
# Usage: packaging/install.sh [--prefix DIR]        (as root; safe to re-run to upgrade)
#
# Every path can be changed through the environment, so tests can install into a temp dir:
#   DESTDIR             a root to install under (staging/tests); nothing outside it is touched
#                       and systemd is not reloaded. The venv is not relocatable: its scripts
#                       name $DESTDIR$RELAYD_PREFIX, so a DESTDIR tree is for inspection.
#   RELAYD_PREFIX       the venv                          (default /opt/relayd; or --prefix)
#   RELAYD_BINDIR       where the relayd link goes        (default /usr/bin)
#   RELAYD_UNITDIR      where the units go                (default /etc/systemd/system)
#   RELAYD_CONFDIR      config directory                  (default /etc/relayd)
#   RELAYD_PYTHON       interpreter for the venv, >= 3.11 (default python3)
#   RELAYD_PIP_ARGS     extra `pip install` arguments, split on spaces (e.g. --no-deps)
#   RELAYD_SKIP_PIP=1   create the venv but install nothing into it (fast tests only)
#   RELAYD_CONFIG_SRC   the config to install            (default <repo>/etc/relayd.toml)
set -euo pipefail

die() { echo "install.sh: $*" >&2; exit 1; }

src=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
prefix=${RELAYD_PREFIX:-/opt/relayd}
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
done
destdir=${DESTDIR:-}
bindir=${RELAYD_BINDIR:-/usr/bin}
unitdir=${RELAYD_UNITDIR:-/etc/systemd/system}
confdir=${RELAYD_CONFDIR:-/etc/relayd}
python=${RELAYD_PYTHON:-python3}
config_src=${RELAYD_CONFIG_SRC:-$src/etc/relayd.toml}

for path in "$prefix" "$bindir" "$unitdir" "$confdir"; do
    # Absolute (they end up in unit files), and no '|' (the sed delimiter below).
    case $path in /*) ;; *) die "not an absolute path: $path" ;; esac
    case $path in *'|'*) die "unsupported character '|' in: $path" ;; esac
done
[ -f "$src/pyproject.toml" ] || die "$src does not look like the relayd repository"
[ -f "$config_src" ] || die "missing config template: $config_src"
if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or set DESTDIR to install under another root)"
fi

venv=$destdir$prefix
if [ ! -x "$venv/bin/python" ]; then
    echo "creating venv $venv"
    "$python" -m venv "$venv"
fi
if [ "${RELAYD_SKIP_PIP:-0}" != 1 ]; then
    echo "installing relayd from $src into $venv"
    # Build from a clean copy: pip builds a local directory in place, and setuptools never
    # prunes its build/ dir, so a module deleted from the repo would still be installed.
    # The repository is not written to at all.
    build=$(mktemp -d)
    trap 'rm -rf -- "$build"' EXIT
    tar -C "$src" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$build" -xf -
    # --upgrade: re-running after `git pull` must replace the installed copy.
    # shellcheck disable=SC2086  # RELAYD_PIP_ARGS is a space-separated list on purpose
    "$venv/bin/python" -m pip install --quiet --upgrade ${RELAYD_PIP_ARGS:-} "$build"
fi

# The link names the venv as seen from the installed system, i.e. without DESTDIR.
link=$destdir$bindir/relayd
if [ -e "$link" ] && [ ! -L "$link" ]; then
    die "$link exists and is not a symlink; not replacing it"
fi
mkdir -p -- "$destdir$bindir"
ln -sfn -- "$prefix/bin/relayd" "$link"

# Units are owned by the package and replaced on upgrade: local changes belong in drop-ins
# (`systemctl edit relayd`). Paths are rewritten only when they differ from the defaults.
mkdir -p -- "$destdir$unitdir"
for unit in relayd.service relayd.socket relayd-agent.service; do
    sed -e "s|/usr/bin/relayd|$bindir/relayd|g" -e "s|/etc/relayd/|$confdir/|g" \
        "$src/packaging/systemd/$unit" > "$destdir$unitdir/$unit.tmp"
    chmod 0644 "$destdir$unitdir/$unit.tmp"
    mv -f -- "$destdir$unitdir/$unit.tmp" "$destdir$unitdir/$unit"
done

# The config is the admin's once installed: never overwrite it.
mkdir -p -- "$destdir$confdir"
config=$destdir$confdir/relayd.toml
# Every path printed is the one written (under DESTDIR when there is one).
config_note="installed $config"
if [ ! -e "$config" ]; then
    install -m 0644 -- "$config_src" "$config"
elif cmp -s -- "$config_src" "$config"; then
    config_note="$config unchanged"
else
    install -m 0644 -- "$config_src" "$config.dist"
    config_note="kept your edited $config; the new default is $config.dist (compare with: diff -u $config $config.dist)"
fi

if [ -z "$destdir" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    reload_note="ran systemctl daemon-reload"
else
    reload_note="systemd not reloaded (not running, or DESTDIR install)"
fi

cat <<EOF
relayd installed:
  venv     $destdir$prefix
  command  $link -> $prefix/bin/relayd
  units    $destdir$unitdir/relayd.service, relayd.socket, relayd-agent.service
  config   $config_note
  $reload_note

Next steps:
  1. Review $confdir/relayd.toml.
  2. Optional admin key (systemd hands it to relayd as a credential; the file stays root-only):
       install -m 600 /dev/stdin $confdir/admin_key    # paste the key, then Ctrl-D
  3. Start it now and at boot:
       systemctl enable --now relayd
     or with socket activation (restarts without refusing connections):
       systemctl enable --now relayd.socket relayd
  4. After an upgrade: systemctl restart relayd. Reload the config: systemctl reload relayd.

The reference agent (relayd-agent.service), on a machine with a model server: write
$confdir/agent.toml ([agent] relay = "wss://...", backend = "http://127.0.0.1:11434/v1"),
put the agent key in $confdir/agent_key (mode 600), then: systemctl enable --now relayd-agent
(docs/operations.md, "The reference agent as a service").
EOF
