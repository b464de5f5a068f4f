#!/usr/bin/env bash
# Remove what packaging/install.sh installed: the units, the relayd link and the venv.
# /etc/relayd (config, admin key) and the state directory (tokens) are kept unless --purge.
#
# Usage: packaging/uninstall.sh [--prefix DIR] [--purge]   (as root)
#
# Takes the same environment as install.sh (DESTDIR, RELAYD_PREFIX, RELAYD_BINDIR,
# RELAYD_UNITDIR, RELAYD_CONFDIR), plus:
#   RELAYD_STATEDIR     the state directory (default /var/lib/relayd; with DynamicUser= the
#                       data lives in /var/lib/private/relayd, which --purge removes too)
set -euo pipefail

die() { echo "uninstall.sh: $*" >&2; exit 1; }

prefix=${RELAYD_PREFIX:-/opt/relayd}
purge=0
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        --purge) purge=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
done
destdir=${DESTDIR:-}
bindir=${RELAYD_BINDIR:-/usr/bin}
unitdir=${RELAYD_UNITDIR:-/etc/systemd/system}
confdir=${RELAYD_CONFDIR:-/etc/relayd}
statedir=${RELAYD_STATEDIR:-/var/lib/relayd}

for path in "$prefix" "$bindir" "$unitdir" "$confdir" "$statedir"; do
    case $path in /?*) ;; *) die "not an absolute path (or /): $path" ;; esac
done
if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or set DESTDIR)"
fi

systemd_running=0
if [ -z "$destdir" ] && [ -d /run/systemd/system ]; then
    systemd_running=1
    # Stop first: removing the files of a running unit leaves it running, unmanaged.
    systemctl disable --now relayd.socket relayd.service relayd-agent.service 2>/dev/null || true
fi

for unit in relayd.service relayd.socket relayd-agent.service; do
    rm -f -- "$destdir$unitdir/$unit"
done

# Only our link: a /usr/bin/relayd from somewhere else stays.
link=$destdir$bindir/relayd
if [ -L "$link" ] && [ "$(readlink -- "$link")" = "$prefix/bin/relayd" ]; then
    rm -f -- "$link"
elif [ -e "$link" ] || [ -L "$link" ]; then
    echo "uninstall.sh: leaving $link: not a link to $prefix/bin/relayd" >&2
fi

# rm -rf only what is recognisably a venv, so a wrong --prefix cannot wipe a real directory.
venv=$destdir$prefix
if [ -f "$venv/pyvenv.cfg" ]; then
    rm -rf -- "$venv"
elif [ -e "$venv" ]; then
    echo "uninstall.sh: leaving $venv: not a venv (no pyvenv.cfg)" >&2
fi

if [ "$purge" = 1 ]; then
    # The agent's state (relayd-agent.service) lives beside relayd's.
    agentdir=$(dirname -- "$statedir")/relayd-agent
    rm -rf -- "$destdir$confdir" "$destdir$statedir" \
        "$destdir$(dirname -- "$statedir")/private/$(basename -- "$statedir")" \
        "$destdir$agentdir" "$destdir$(dirname -- "$statedir")/private/relayd-agent"
    echo "relayd removed, including $destdir$confdir and $destdir$statedir (--purge)"
else
    echo "relayd removed; kept $destdir$confdir and $destdir$statedir (use --purge to delete them)"
fi

if [ "$systemd_running" = 1 ]; then
    systemctl daemon-reload
fi
