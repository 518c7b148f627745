"""install.sh into a temp tree (--root), as an admin would run it."""
import os
import re
import shutil
import stat
import subprocess
import sys

import bx24ast
from conftest import ROOT

INSTALL = os.path.join(ROOT, "install.sh")
BASH = shutil.which("bash")
PASSWORD = "correct horse battery"


def install(tree, *args, env=None, input_text=None):
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([BASH, INSTALL, "--root", str(tree)] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=full_env, timeout=120,
                          input=input_text)
    return proc.returncode, proc.stdout, proc.stderr


def mode(path):
    return stat.S_IMODE(os.stat(str(path)).st_mode)


def test_install_creates_every_piece_with_the_right_modes(tmp_path):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text('ID=debian\nVERSION_ID="12"\n')
    (tree / "lib" / "systemd" / "system").mkdir(parents=True)
    (tree / "lib" / "systemd" / "system" / "asterisk.service").write_text("[Unit]\n")
    code, out, err = install(tree, "--non-interactive", "--init", "systemd", "--user", "admin",
                             "--password", PASSWORD)
    assert code == 0, err
    assert "host: debian 12, family debian, init systemd" in out
    assert "open the wizard: https://" in out and ":8078/config/master (login admin)" in out
    conf = tree / "etc" / "bx24ast" / "bx24ast.conf"
    assert mode(conf) == 0o600 and mode(tree / "etc" / "bx24ast") == 0o700
    assert mode(tree / "var" / "lib" / "bx24ast") == 0o700
    assert (tree / "var" / "log" / "bx24ast").is_dir()
    assert mode(tree / "opt" / "bx24ast" / "bx24ast.py") == 0o755
    with open(str(tree / "opt" / "bx24ast" / "bx24ast.py")) as a, open(os.path.join(ROOT, "bx24ast.py")) as b:
        assert a.read() == b.read()
    assert mode(tree / "opt" / "bx24ast" / "hooks.example.py") == 0o644
    assert "hooks: examples in" in out
    config = bx24ast.Config.load(str(conf))
    # --root: every path of the configuration is inside the tree, the wizard looks there
    assert config.get("storage", "state_dir") == str(tree / "var" / "lib" / "bx24ast")
    assert config.get("log", "file") == str(tree / "var" / "log" / "bx24ast" / "bx24ast.log")
    assert config.get("wizard", "user") == "admin" and config.get("wizard", "listen") == ("0.0.0.0", 8078)
    assert config.get("wizard", "tls_cert") == str(tree / "etc" / "bx24ast" / "tls" / "cert.pem")
    assert config.get("wizard", "pbx_root") == str(tree)
    assert bx24ast.verify_password(PASSWORD, config.get("wizard", "password_hash"))
    assert PASSWORD not in conf.read_text()
    assert mode(tree / "etc" / "bx24ast" / "tls" / "key.pem") == 0o600
    unit = (tree / "etc" / "systemd" / "system" / "bx24ast.service").read_text()
    assert "Restart=always" in unit and "After=network-online.target asterisk.service" in unit
    start = re.search(r"^ExecStart=(\S+) -c (\S+) run$", unit, re.M)
    launcher = tree / "opt" / "bx24ast" / "bx24ast"
    assert start and start.group(1) == str(launcher) and start.group(2) == str(conf)
    # the launcher runs the interpreter itself, never a shim that needs the login shell's PATH
    shebang = launcher.read_text().splitlines()[0]
    assert shebang.endswith(" -IS") and mode(launcher) == 0o755
    python = shebang[2:-len(" -IS")]
    assert os.path.isabs(python) and "shims" not in python and os.path.realpath(python) == python
    with open(python, "rb") as f:
        assert f.read(4) == b"\x7fELF", "%s is a script, not the interpreter" % python
    assert "LimitNOFILE=4096" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    cron = (tree / "etc" / "cron.d" / "bx24ast").read_text()
    assert re.search(r"^\* \* \* \* \* root %s -c %s check --cron$" % (
        re.escape(str(launcher)), re.escape(str(conf))), cron, re.M)
    assert "copytruncate" in (tree / "etc" / "logrotate.d" / "bx24ast").read_text()
    assert "service not started (--root" in out


def test_the_command_on_path_runs_the_module_precompiled_for_the_interpreter(tmp_path):
    tree = tmp_path / "tree"
    code, out, err = install(tree, "--non-interactive", "--password", PASSWORD)
    assert code == 0, err
    opt = tree / "opt" / "bx24ast"
    on_path = tree / "usr" / "local" / "bin" / "bx24ast"
    assert os.path.realpath(str(on_path)) == str(opt / "bx24ast")
    assert "command: %s (precompiled for " % on_path in out
    python = (opt / "bx24ast").read_text().splitlines()[0][2:].split()[0]
    tag = subprocess.check_output([python, "-c", "import sys; print(sys.implementation.cache_tag)"],
                                  universal_newlines=True).strip()
    compiled = opt / "__pycache__" / ("bx24ast.%s.pyc" % tag)
    assert compiled.is_file()
    before = os.stat(str(compiled)).st_mtime_ns
    conf = str(tree / "etc" / "bx24ast" / "bx24ast.conf")
    proc = subprocess.run([str(on_path), "-c", conf, "check-config"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert proc.returncode in (0, 1, 2) and "Traceback" not in proc.stdout, proc.stdout
    assert subprocess.check_output([str(on_path), "--version"], universal_newlines=True).strip() == \
        "bx24ast %s" % bx24ast.__version__
    assert os.stat(str(compiled)).st_mtime_ns == before, "the launcher compiled the module again"
    # the environment of a login shell does not reach it (-I): no PYTHONPATH module shadows the stdlib
    (tmp_path / "json.py").write_text("raise SystemExit('shadowed')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    assert subprocess.run([str(on_path), "--version"], env=env, stdout=subprocess.PIPE).returncode == 0


def test_rerun_upgrades_in_place_and_keeps_the_configuration(tmp_path):
    tree = tmp_path / "tree"
    assert install(tree, "--non-interactive", "--password", PASSWORD)[0] == 0
    conf = str(tree / "etc" / "bx24ast" / "bx24ast.conf")
    bx24ast.update_config_file(conf, {("ami", "secret"): "edited-by-admin"})
    hashed = bx24ast.Config.load(conf).get("wizard", "password_hash")
    program = tree / "opt" / "bx24ast" / "bx24ast.py"
    program.write_text("# an old version\n")
    code, out, err = install(tree, "--non-interactive")
    assert code == 0, err
    assert "kept as it is (upgrade)" in out and "wizard login: kept" in out
    config = bx24ast.Config.load(conf)
    assert config.get("ami", "secret") == "edited-by-admin" and config.get("wizard", "password_hash") == hashed
    assert "an old version" not in program.read_text()
    # a new password on a re-run replaces the hash
    assert install(tree, "--non-interactive", "--password", "another long secret")[0] == 0
    assert bx24ast.verify_password("another long secret", bx24ast.Config.load(conf).get("wizard", "password_hash"))


def test_sysv_init_script_when_there_is_no_systemd(tmp_path):
    tree = tmp_path / "tree"
    code, out, err = install(tree, "--non-interactive", "--init", "sysv", "--password", PASSWORD)
    assert code == 0, err
    script = tree / "etc" / "init.d" / "bx24ast"
    assert mode(script) == 0o755 and not (tree / "etc" / "systemd").exists()
    text = script.read_text()
    assert "chkconfig: 2345" in text and "PIDFILE=%s/var/lib/bx24ast/bx24ast.pid" % tree in text
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0


def test_uninstall_keeps_config_and_state_unless_purge(tmp_path):
    tree = tmp_path / "tree"
    assert install(tree, "--non-interactive", "--password", PASSWORD)[0] == 0
    code, out, _ = install(tree, "--uninstall")
    assert code == 0
    for gone in ("opt/bx24ast", "etc/cron.d/bx24ast", "etc/logrotate.d/bx24ast", "var/log/bx24ast",
                 "etc/systemd/system/bx24ast.service", "usr/local/bin/bx24ast"):
        assert not os.path.lexists(str(tree / gone)), gone
    assert (tree / "etc" / "bx24ast" / "bx24ast.conf").exists() and (tree / "var" / "lib" / "bx24ast").exists()
    assert "--purge removes them" in out
    assert install(tree, "--uninstall", "--purge")[0] == 0
    assert not (tree / "etc" / "bx24ast").exists() and not (tree / "var" / "lib" / "bx24ast").exists()


def test_bad_passwords_are_refused(tmp_path):
    code, _, err = install(tmp_path / "a", "--non-interactive", "--password", "short")
    assert code == 1 and "shorter than 10 characters" in err
    code, _, err = install(tmp_path / "b", "--non-interactive")
    assert code == 1 and "no wizard password" in err and "--password" in err
    # the environment works as well as the flags
    code, out, err = install(tmp_path / "c", "--non-interactive", env={"BX24AST_USER": "boss",
                                                                       "BX24AST_PASSWORD": PASSWORD})
    assert code == 0, err
    assert "wizard login: boss" in out


def _stub_path(tmp_path, python_version=None):
    """A PATH with the few tools the installer needs before it looks for Python,
    and a python3 that is too old (or none)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("dirname", "sed", "cat", "id"):
        os.symlink(shutil.which(tool), str(bin_dir / tool))
    if python_version:
        stub = bin_dir / "python3"
        stub.write_text("#!/bin/sh\necho %s\n" % python_version)
        stub.chmod(0o755)
    return {"PATH": str(bin_dir)}


def test_too_old_or_missing_python_is_refused_clearly(tmp_path):
    code, _, err = install(tmp_path / "t1", "--non-interactive", "--password", PASSWORD,
                           env=_stub_path(tmp_path / "old", "3.5"))
    assert code == 1 and "Python 3.6 or newer is needed; this host has only python3 (3.5)" in err
    assert "yum install -y python3" in err
    code, _, err = install(tmp_path / "t2", "--non-interactive", "--password", PASSWORD,
                           env=_stub_path(tmp_path / "none"))
    assert code == 1 and ("Python 3.6+ is not installed" in err or "neither apt-get nor yum" in err)


def test_install_script_stays_within_bash_4_2():
    text = open(INSTALL).read()
    assert subprocess.run(["bash", "-n", INSTALL]).returncode == 0
    newer = {r"\bdeclare -n\b|\blocal -n\b": "namerefs (4.3)", r"\bwait -n\b": "wait -n (4.3)",
             r"\$\{[^}]*@[QEPAa]\}": "${var@op} (4.4)", r"\b(mapfile|readarray) -d\b": "mapfile -d (4.4)",
             r"\[-1\]": "negative subscripts (4.3)", r"\bEPOCH(SECONDS|REALTIME)\b": "EPOCHSECONDS (5.0)",
             r"\bSRANDOM\b": "SRANDOM (5.1)", r"\$\{[A-Za-z_]+\[@\]@": "array transformations (4.4)"}
    for pattern, what in newer.items():
        assert not re.search(pattern, text), what
