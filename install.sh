#!/usr/bin/env bash
# bx24ast installer: wget https://…/install.sh && bash install.sh
#
#   bash install.sh                         ask for the wizard login and password
#   bash install.sh --non-interactive --user admin --password '…'
#                                           (or BX24AST_USER / BX24AST_PASSWORD)
#   bash install.sh --uninstall [--purge]   remove it (--purge: config and state too)
#   bash install.sh --root DIR              install into DIR instead of / (no service is started)
#   other options: --init systemd|sysv, --install-python (install python3 with apt/yum when missing)
#
# Runs on bash 4.2 (CentOS 7, FreePBX SNG7) and later; re-running upgrades in
# place and keeps the configuration.
set -u

ROOT=""
INTERACTIVE=1
WIZARD_USER="${BX24AST_USER:-}"
WIZARD_PASSWORD="${BX24AST_PASSWORD:-}"
ACTION=install
PURGE=0
INSTALL_PYTHON=0
FORCE_INIT=""
# Where bx24ast.py is downloaded from when it is not next to this script.
BX24AST_URL="${BX24AST_URL:-}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

say() { printf '== %s\n' "$*"; }
fail() {
    # $1: what went wrong, $2: what to do about it
    printf 'bx24ast install: FAILED: %s\n' "$1" >&2
    [ -n "${2:-}" ] && printf 'bx24ast install: what to do: %s\n' "$2" >&2
    exit 1
}

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || fail "--root needs a directory" "bash install.sh --root /tmp/tree"
                ROOT="${2%/}"; shift 2 ;;
        --root=*) ROOT="${1#--root=}"; ROOT="${ROOT%/}"; shift ;;
        --non-interactive|-y) INTERACTIVE=0; shift ;;
        --user) [ $# -ge 2 ] || fail "--user needs a login" ""; WIZARD_USER="$2"; shift 2 ;;
        --password) [ $# -ge 2 ] || fail "--password needs a value" ""; WIZARD_PASSWORD="$2"; shift 2 ;;
        --install-python) INSTALL_PYTHON=1; shift ;;
        --init) [ $# -ge 2 ] || fail "--init needs systemd or sysv" ""; FORCE_INIT="$2"; shift 2 ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage 0 ;;
        *) printf 'bx24ast install: unknown option %s\n' "$1" >&2; usage 2 ;;
    esac
done

OPT_DIR="$ROOT/opt/bx24ast"
LAUNCHER="$OPT_DIR/bx24ast"
ON_PATH="$ROOT/usr/local/bin/bx24ast"
ETC_DIR="$ROOT/etc/bx24ast"
CONF="$ETC_DIR/bx24ast.conf"
STATE_DIR="$ROOT/var/lib/bx24ast"
LOG_DIR="$ROOT/var/log/bx24ast"
UNIT="$ROOT/etc/systemd/system/bx24ast.service"
INITSCRIPT="$ROOT/etc/init.d/bx24ast"
CRON="$ROOT/etc/cron.d/bx24ast"
LOGROTATE="$ROOT/etc/logrotate.d/bx24ast"

# -- what this host is ---------------------------------------------------------------------------
detect_os() {
    OS_NAME="unknown"
    OS_FAMILY="unknown"
    if [ -f "$ROOT/etc/os-release" ]; then
        OS_NAME="$(. "$ROOT/etc/os-release" && printf '%s %s' "${ID:-}" "${VERSION_ID:-}")"
        local like
        like="$(. "$ROOT/etc/os-release" && printf '%s %s' "${ID:-}" "${ID_LIKE:-}")"
        case " $like " in
            *" debian "*|*" ubuntu "*) OS_FAMILY=debian ;;
            *" rhel "*|*" centos "*|*" fedora "*|*" rocky "*|*" almalinux "*) OS_FAMILY=rhel ;;
        esac
    elif [ -f "$ROOT/etc/redhat-release" ]; then
        OS_NAME="$(cat "$ROOT/etc/redhat-release")"
        OS_FAMILY=rhel
    fi
    if [ -f "$ROOT/etc/schmooze/pbx-brand" ] || [ -f "$ROOT/etc/sangoma/pbx" ] || [ -f "$ROOT/etc/freepbx.conf" ]; then
        OS_NAME="$OS_NAME (FreePBX)"
    elif [ -f "$ROOT/etc/issabel.conf" ]; then
        OS_NAME="$OS_NAME (Issabel)"
    fi
    if [ -n "$FORCE_INIT" ]; then
        case "$FORCE_INIT" in systemd|sysv) INIT="$FORCE_INIT" ;; *) fail "--init $FORCE_INIT" "--init systemd or --init sysv" ;; esac
    elif [ -d /run/systemd/system ] || { [ -n "$ROOT" ] && command -v systemctl >/dev/null 2>&1; }; then
        INIT=systemd
    else
        INIT=sysv
    fi
    say "host: $OS_NAME, family $OS_FAMILY, init $INIT"
}

python_version() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

real_python() {
    # The interpreter itself, not a pyenv/asdf shim or a symlink that an upgrade may
    # point elsewhere: the unit and cron run it without the login shell's PATH.
    local exe
    exe="$("$1" -c 'import sys; print(sys.executable)' 2>/dev/null)" || return 1
    [ -n "$exe" ] && [ -x "$exe" ] || return 1
    readlink -f "$exe" 2>/dev/null || printf '%s\n' "$exe"
}

find_python() {
    PYTHON=""
    local candidate version major minor best_bad=""
    for candidate in python3 python3.13 python3.12 python3.11 python3.10 python3.9 python3.8 python3.7 python3.6; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        version="$(python_version "$candidate")" || continue
        [ -n "$version" ] || continue
        major="${version%%.*}"
        minor="${version#*.}"
        if [ "$major" -eq 3 ] && [ "$minor" -ge 6 ]; then
            PYTHON="$(real_python "$candidate")" || PYTHON="$(command -v "$candidate")"
            say "Python $version: $PYTHON"
            return 0
        fi
        best_bad="$candidate ($version)"
    done
    if [ -n "$best_bad" ]; then
        fail "Python 3.6 or newer is needed; this host has only $best_bad" \
             "install python3 (CentOS 7: yum install -y python3; Debian/Ubuntu: apt-get install -y python3), then run this again"
    fi
    return 1
}

install_python() {
    local tool=""
    if command -v apt-get >/dev/null 2>&1; then tool="apt-get install -y python3"
    elif command -v yum >/dev/null 2>&1; then tool="yum install -y python3"
    elif command -v dnf >/dev/null 2>&1; then tool="dnf install -y python3"
    fi
    [ -n "$tool" ] || fail "no python3, and neither apt-get nor yum to install it" "install Python 3.6+ by hand"
    if [ "$INSTALL_PYTHON" -ne 1 ]; then
        if [ "$INTERACTIVE" -eq 1 ]; then
            local answer
            read -r -p "Python 3 is not installed. Install it now with '$tool'? [Y/n] " answer
            case "$answer" in [nN]*) fail "Python 3 is needed" "$tool" ;; esac
        else
            fail "Python 3.6+ is not installed" "$tool, or run with --install-python"
        fi
    fi
    say "installing Python: $tool"
    $tool || fail "'$tool' failed" "install Python 3.6+ by hand, then run this again"
}

# -- the pieces ------------------------------------------------------------------------------------
fetch_program() {
    mkdir -p "$OPT_DIR" || fail "cannot create $OPT_DIR" "run as root"
    if [ -f "$HERE/bx24ast.py" ]; then
        install -m 0755 "$HERE/bx24ast.py" "$OPT_DIR/bx24ast.py.new" || fail "cannot copy bx24ast.py" "check $OPT_DIR"
        say "program: $OPT_DIR/bx24ast.py (from $HERE)"
    else
        [ -n "$BX24AST_URL" ] || fail "bx24ast.py is not next to install.sh and BX24AST_URL is not set" \
            "download bx24ast.py into $HERE, or run: BX24AST_URL=https://…/bx24ast.py bash install.sh"
        say "downloading $BX24AST_URL"
        if command -v curl >/dev/null 2>&1; then
            curl -fsSL -o "$OPT_DIR/bx24ast.py.new" "$BX24AST_URL"
        elif command -v wget >/dev/null 2>&1; then
            wget -q -O "$OPT_DIR/bx24ast.py.new" "$BX24AST_URL"
        else
            false
        fi || fail "cannot download $BX24AST_URL" "put bx24ast.py next to install.sh, or set BX24AST_URL"
        chmod 0755 "$OPT_DIR/bx24ast.py.new"
    fi
    "$PYTHON" "$OPT_DIR/bx24ast.py.new" --version >/dev/null 2>&1 \
        || fail "the new bx24ast.py does not run under $PYTHON" "download it again"
    mv -f "$OPT_DIR/bx24ast.py.new" "$OPT_DIR/bx24ast.py"
    if [ -f "$HERE/hooks.example.py" ]; then
        # the worked examples of every hook, to copy into /etc/bx24ast/hooks.py
        install -m 0644 "$HERE/hooks.example.py" "$OPT_DIR/hooks.example.py" \
            && say "hooks: examples in $OPT_DIR/hooks.example.py"
    fi
    write_launcher
}

write_launcher() {
    # Python never caches the bytecode of a script it runs directly: compiled here once
    # for this interpreter, the ~10,000 lines are not compiled again at every cron run.
    "$PYTHON" -c 'import py_compile, sys; py_compile.compile(sys.argv[1], doraise=True)' "$OPT_DIR/bx24ast.py" \
        || fail "cannot compile $OPT_DIR/bx24ast.py with $PYTHON" "download it again"
    # -I -S: no environment, no site-packages (bx24ast needs the standard library only)
    cat > "$LAUNCHER.new" <<EOF
#!$PYTHON -IS
# bx24ast, installed by install.sh: runs the precompiled $OPT_DIR/bx24ast.py
import sys
sys.path.insert(0, "$OPT_DIR")
from bx24ast import main
sys.exit(main())
EOF
    chmod 0755 "$LAUNCHER.new" && mv -f "$LAUNCHER.new" "$LAUNCHER" || fail "cannot write $LAUNCHER" "check $OPT_DIR"
    "$LAUNCHER" --version >/dev/null 2>&1 || fail "$LAUNCHER does not run" "run $PYTHON $OPT_DIR/bx24ast.py --version"
    mkdir -p "$(dirname "$ON_PATH")" && ln -sfn "$LAUNCHER" "$ON_PATH" \
        || fail "cannot link $ON_PATH" "run $LAUNCHER directly"
    say "command: $ON_PATH (precompiled for $PYTHON)"
}

bx() {
    "$PYTHON" "$OPT_DIR/bx24ast.py" -c "$CONF" "$@"
}

write_config() {
    mkdir -p "$ETC_DIR" && chmod 0700 "$ETC_DIR" || fail "cannot create $ETC_DIR" "run as root"
    if [ -f "$CONF" ]; then
        say "configuration: $CONF kept as it is (upgrade)"
    else
        ( umask 077 && "$PYTHON" "$OPT_DIR/bx24ast.py" example-config > "$CONF" ) \
            || fail "cannot write $CONF" "check $ETC_DIR"
        # With --root every path is inside the tree, and the wizard looks at the PBX there.
        bx set "storage.state_dir=$STATE_DIR" "log.file=$LOG_DIR/bx24ast.log" "wizard.pbx_root=${ROOT:-/}" >/dev/null \
            || fail "cannot set the paths in $CONF" ""
        say "configuration: $CONF (new, mode 0600)"
    fi
    chmod 0600 "$CONF"
    mkdir -p "$STATE_DIR" "$LOG_DIR" && chmod 0700 "$STATE_DIR" && chmod 0750 "$LOG_DIR" \
        || fail "cannot create $STATE_DIR or $LOG_DIR" "run as root"
    say "state: $STATE_DIR, logs: $LOG_DIR"
}

ask_login() {
    if [ -z "$WIZARD_USER" ] && [ "$INTERACTIVE" -eq 1 ]; then
        read -r -p "Wizard login [admin]: " WIZARD_USER
    fi
    WIZARD_USER="${WIZARD_USER:-admin}"
    if [ -z "$WIZARD_PASSWORD" ]; then
        if grep -q '^password_hash = .' "$CONF" 2>/dev/null; then
            say "wizard login: kept (give --password to change it)"
            return 0
        fi
        [ "$INTERACTIVE" -eq 1 ] || fail "no wizard password" "give --password (10+ characters) or BX24AST_PASSWORD"
        local again
        while :; do
            read -r -s -p "Wizard password (10 characters or more): " WIZARD_PASSWORD; echo
            read -r -s -p "The same again: " again; echo
            if [ "${#WIZARD_PASSWORD}" -lt 10 ]; then echo "Too short."; continue; fi
            if [ "$WIZARD_PASSWORD" != "$again" ]; then echo "They differ."; continue; fi
            break
        done
    fi
    [ "${#WIZARD_PASSWORD}" -ge 10 ] || fail "the wizard password is shorter than 10 characters" "choose a longer one"
    printf '%s\n' "$WIZARD_PASSWORD" | bx set-password --user "$WIZARD_USER" >/dev/null \
        || fail "cannot store the wizard login" "check $CONF"
    say "wizard login: $WIZARD_USER (password stored as a salted PBKDF2 hash)"
}

make_certificate() {
    local tls="$ETC_DIR/tls"
    if [ -f "$tls/cert.pem" ] && [ -f "$tls/key.pem" ]; then
        say "wizard certificate: $tls/cert.pem kept"
    elif command -v openssl >/dev/null 2>&1; then
        mkdir -p "$tls" && chmod 0700 "$tls"
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=$(hostname 2>/dev/null || echo bx24ast)" \
            -keyout "$tls/key.pem" -out "$tls/cert.pem" >/dev/null 2>&1 \
            || fail "openssl could not make the wizard's certificate" "run: openssl req -x509 -newkey rsa:2048 -nodes -keyout $tls/key.pem -out $tls/cert.pem"
        chmod 0600 "$tls/key.pem"
        say "wizard certificate: $tls/cert.pem (self-signed, 10 years)"
    else
        say "openssl not found: the wizard listens on 127.0.0.1 over plain HTTP"
        grep -q '^listen = .' <(sed -n '/^\[wizard\]/,/^\[/p' "$CONF") || bx set wizard.listen=127.0.0.1:8078 >/dev/null
        WIZARD_TLS=0
        return 0
    fi
    WIZARD_TLS=1
    if ! sed -n '/^\[wizard\]/,/^\[/p' "$CONF" | grep -q '^listen = .'; then
        bx set wizard.listen=0.0.0.0:8078 "wizard.tls_cert=$tls/cert.pem" \
            "wizard.tls_key=$tls/key.pem" >/dev/null || fail "cannot enable the wizard in $CONF" ""
    fi
}

write_service() {
    local after="network-online.target"
    if [ -f "$ROOT/lib/systemd/system/asterisk.service" ] || [ -f "$ROOT/usr/lib/systemd/system/asterisk.service" ] \
        || [ -f "$ROOT/etc/systemd/system/asterisk.service" ]; then
        after="$after asterisk.service"
    fi
    if [ "$INIT" = systemd ]; then
        mkdir -p "$(dirname "$UNIT")"
        cat > "$UNIT" <<EOF
[Unit]
Description=bx24ast: Asterisk to Bitrix24 telephony bridge
After=$after
Wants=network-online.target

[Service]
Type=simple
ExecStart=$LAUNCHER -c $CONF run
ExecReload=/bin/kill -HUP \$MAINPID
Restart=always
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=30
# Listeners cap their connections far below this; the margin is for the state
# database, AMI and the portal while a port is being flooded.
LimitNOFILE=4096

[Install]
WantedBy=multi-user.target
EOF
        say "service: $UNIT (Restart=always, after $after)"
    else
        mkdir -p "$(dirname "$INITSCRIPT")"
        cat > "$INITSCRIPT" <<EOF
#!/bin/sh
# chkconfig: 2345 95 05
# description: bx24ast, Asterisk to Bitrix24 telephony bridge
### BEGIN INIT INFO
# Provides:          bx24ast
# Required-Start:    \$network \$remote_fs
# Required-Stop:     \$network \$remote_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: Asterisk to Bitrix24 telephony bridge
### END INIT INFO
PIDFILE=$STATE_DIR/bx24ast.pid
RUN="$LAUNCHER -c $CONF run"
running() { [ -s "\$PIDFILE" ] && kill -0 "\$(cat "\$PIDFILE")" 2>/dev/null; }
case "\$1" in
  start)   running && { echo "bx24ast is running"; exit 0; }
           ulimit -n 4096 2>/dev/null
           nohup \$RUN >/dev/null 2>&1 &
           echo "bx24ast started" ;;
  stop)    running && kill -TERM "\$(cat "\$PIDFILE")"; echo "bx24ast stopped" ;;
  restart) \$0 stop; sleep 2; \$0 start ;;
  reload)  running && kill -HUP "\$(cat "\$PIDFILE")" ;;
  status)  running && { echo "bx24ast is running"; exit 0; }; echo "bx24ast is stopped"; exit 3 ;;
  *)       echo "usage: \$0 start|stop|restart|reload|status"; exit 2 ;;
esac
EOF
        chmod 0755 "$INITSCRIPT"
        say "service: $INITSCRIPT (SysV init script)"
    fi
    mkdir -p "$(dirname "$CRON")"
    printf '# bx24ast: health check every minute; silent when all is well, restarts a dead service\n* * * * * root %s -c %s check --cron\n' \
        "$LAUNCHER" "$CONF" > "$CRON"
    chmod 0644 "$CRON"
    say "cron: $CRON (check --cron every minute)"
    mkdir -p "$(dirname "$LOGROTATE")"
    cat > "$LOGROTATE" <<EOF
$LOG_DIR/*.log {
    weekly
    rotate 8
    compress
    delaycompress
    missingok
    notifempty
    copytruncate
}
EOF
    say "logrotate: $LOGROTATE"
}

start_service() {
    if [ -n "$ROOT" ]; then
        say "service not started (--root $ROOT)"
        return 0
    fi
    if [ "$INIT" = systemd ]; then
        systemctl daemon-reload && systemctl enable bx24ast >/dev/null 2>&1 && systemctl restart bx24ast \
            || fail "the service did not start" "journalctl -u bx24ast -n 50; bx24ast run -f shows why"
    else
        if command -v chkconfig >/dev/null 2>&1; then chkconfig --add bx24ast; \
        elif command -v update-rc.d >/dev/null 2>&1; then update-rc.d bx24ast defaults >/dev/null; fi
        "$INITSCRIPT" restart || fail "the service did not start" "bx24ast run -f shows why"
    fi
    say "service started"
}

print_url() {
    local addresses="" scheme=https port=8078
    [ "${WIZARD_TLS:-1}" -eq 1 ] || scheme=http
    if command -v hostname >/dev/null 2>&1; then addresses="$(hostname -I 2>/dev/null)"; fi
    if [ -z "$addresses" ] && command -v ip >/dev/null 2>&1; then
        addresses="$(ip -o -4 addr show scope global 2>/dev/null | awk '{split($4, a, "/"); printf "%s ", a[1]}')"
    fi
    echo
    if [ "$scheme" = http ]; then
        say "open the wizard through an SSH tunnel: ssh -L 8078:127.0.0.1:8078 root@<this host>, then http://127.0.0.1:8078/config/master"
    else
        local a
        for a in ${addresses:-<this-host>}; do
            case "$a" in *:*) a="[$a]" ;; esac
            say "open the wizard: https://$a:$port/config/master (login $WIZARD_USER)"
        done
    fi
}

uninstall() {
    say "removing bx24ast"
    if [ -z "$ROOT" ]; then
        if [ -d /run/systemd/system ]; then
            systemctl disable --now bx24ast >/dev/null 2>&1
        elif [ -x "$INITSCRIPT" ]; then
            "$INITSCRIPT" stop >/dev/null 2>&1
        fi
    fi
    local path
    for path in "$UNIT" "$INITSCRIPT" "$CRON" "$LOGROTATE" "$ON_PATH" "$OPT_DIR" "$LOG_DIR"; do
        if [ -e "$path" ] || [ -L "$path" ]; then rm -rf "$path" && say "removed $path"; fi
    done
    [ -z "$ROOT" ] && [ -d /run/systemd/system ] && systemctl daemon-reload >/dev/null 2>&1
    if [ "$PURGE" -eq 1 ]; then
        for path in "$ETC_DIR" "$STATE_DIR"; do
            if [ -e "$path" ]; then rm -rf "$path" && say "removed $path"; fi
        done
    else
        say "kept $ETC_DIR and $STATE_DIR (--purge removes them)"
    fi
    exit 0
}

# -- main ----------------------------------------------------------------------------------------------
[ "$ACTION" = uninstall ] && uninstall
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
    fail "the installer must run as root" "sudo bash install.sh"
fi
detect_os
find_python || { install_python; find_python || fail "Python 3.6+ is still not found" "install it by hand"; }
fetch_program
write_config
ask_login
make_certificate
write_service
start_service
say "done: bx24ast $("$LAUNCHER" --version 2>&1 | awk '{print $2}') installed"
print_url
