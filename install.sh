#!/usr/bin/env bash
# bx24ast installer - NOT WRITTEN YET.
#
# The one-line installer (systemd unit, cron health check, web wizard, config in
# /etc/bx24ast) is a later milestone. Until then this script installs nothing and
# says so, rather than pretending. Manual installation is described in README.md.
set -eu
echo "bx24ast: install.sh is not implemented yet; nothing was changed." >&2
echo "Install by hand as README.md describes (copy bx24ast.py, write /etc/bx24ast/bx24ast.conf)." >&2
exit 1
