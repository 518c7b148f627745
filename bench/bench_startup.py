#!/usr/bin/env python3
"""What a command costs to start: `check --cron` (cron runs it every minute), `replay`
of a capture, and the idle daemon's memory, next to the floor of the same interpreter
(`python3 -I -S -c "import socket, json"`), for each Python given.

bx24ast is installed as install.sh does it (into a temp tree with --root: precompiled,
the `bx24ast` launcher), and the same commands also run as `python3 bx24ast.py` (the
script compiled from source at every run). `check --cron` runs the way cron meets it
on a working PBX: the daemon runs, connected to a fake Asterisk and to the Bitrix24
emulator, its heartbeat fresh.

Wall time is the best and the median of --runs runs, interleaved across contenders;
memory is the peak RSS of the process, measured by GNU time when it is installed (a
child's ru_maxrss counts the parent's pages it was forked with: ~3 MB too much), the
daemon's is its RSS once settled. Also printed: the machine's calibration figure.

Usage: python3 bench/bench_startup.py [--python /usr/bin/python3 --python ~/.pyenv/versions/3.6.15/bin/python3]
"""
import argparse
import glob
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROGRAM = os.path.join(ROOT, "bx24ast.py")
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "tests")]
from bench_latency import calibration  # noqa: E402
from b24_emulator import Bitrix24Emulator  # noqa: E402
from fake_ami import FakeAmiServer  # noqa: E402

CAPTURE = os.path.join(ROOT, "tests", "fixtures", "asterisk-22.10.1-pjsip", "inbound_answered")
GNU_TIME = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None


def timed(argv):
    """(seconds, peak RSS in MB) of one run of argv."""
    if GNU_TIME:
        out = tempfile.NamedTemporaryFile(prefix="bench-time-")
        argv = [GNU_TIME, "-o", out.name, "-f", "%M"] + argv
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _pid, _status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - t0
    proc.returncode = 0
    if GNU_TIME:
        with open(out.name) as f:
            return took, int(f.read().split()[-1]) / 1024.0
    return took, usage.ru_maxrss / 1024.0


def rss_of(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def install(python, tree):
    """install.sh --root tree under python; the launcher's path."""
    env = dict(os.environ, PATH="%s:%s" % (os.path.dirname(python), os.environ.get("PATH", "")))
    subprocess.check_call(["bash", os.path.join(ROOT, "install.sh"), "--root", tree, "--non-interactive",
                           "--password", "correct horse battery"], env=env, stdout=subprocess.DEVNULL)
    return os.path.join(tree, "opt", "bx24ast", "bx24ast")


def config(tmp, ami_port, webhook):
    """A PBX with CEL in sqlite (a copy of a real one, its newest event a minute old)."""
    cel = os.path.join(tmp, "master.db")
    shutil.copy(os.path.join(CAPTURE, "cel.sqlite3"), cel)
    db = sqlite3.connect(cel)
    db.execute("INSERT INTO cel (eventtype, eventtime, uniqueid, linkedid) VALUES ('CHAN_START', ?, '1.1', '1.1')",
               (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 60)),))
    db.commit()
    db.close()
    conf = os.path.join(tmp, "bx24ast.conf")
    with open(conf, "w") as f:
        f.write("[ami]\nhost = 127.0.0.1\nport = %d\nusername = bx24\nsecret = s3cret\n[storage]\nstate_dir = %s\n"
                "[routing]\nagi_listen =\nhttp_listen =\n[cel]\nbackend = sqlite\nsqlite_path = %s\n"
                "[bitrix24]\nwebhook_url = %s\ntimeout = 1\n" % (ami_port, os.path.join(tmp, "state"), cel, webhook))
    return conf


def wait_healthy(conf, python, timeout=40):
    """Until `check --cron` is silent: the daemon connected, its heartbeat tells of an answer."""
    deadline = time.time() + timeout
    out = b""
    while time.time() < deadline:
        out = subprocess.run([python, PROGRAM, "-c", conf, "check", "--cron", "--restart-command", "true"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout
        if not out.strip():
            return True
        time.sleep(1)
    sys.stdout.write(out.decode("utf-8", "replace"))
    return False


def measure(python, runs):
    version = subprocess.check_output([python, "-c", "import sys; print(sys.version.split()[0])"],
                                      universal_newlines=True).strip()
    tmp = tempfile.mkdtemp(prefix="bench-startup-")
    try:
        launcher = install(python, os.path.join(tmp, "tree"))
        with Bitrix24Emulator(rate=100, burst=100) as emu, FakeAmiServer() as ami:
            conf = config(tmp, ami.port, emu.webhook_url)
            daemon = subprocess.Popen([launcher, "-c", conf, "run", "-f"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            try:
                healthy = wait_healthy(conf, python)
                time.sleep(3)
                daemon_launcher = rss_of(daemon.pid)
                cron = ["-c", conf, "check", "--cron", "--restart-command", "true"]
                contenders = [
                    ("floor: -I -S -c 'import socket, json'", [python, "-I", "-S", "-c", "import socket, json"]),
                    ("check --cron, bx24ast (installed)", [launcher] + cron),
                    ("check --cron, python3 bx24ast.py", [python, PROGRAM] + cron),
                    ("replay a capture, bx24ast (installed)", [launcher, "replay", CAPTURE]),
                    ("replay a capture, python3 bx24ast.py", [python, PROGRAM, "replay", CAPTURE])]
                results = dict((name, []) for name, _ in contenders)
                for _ in range(runs):
                    for name, argv in contenders:     # interleaved: each round runs each contender once
                        results[name].append(timed(argv))
            finally:
                daemon.terminate()
                daemon.wait(20)
            script = subprocess.Popen([python, PROGRAM, "-c", conf, "run", "-f"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            try:
                time.sleep(4)
                daemon_script = rss_of(script.pid)
            finally:
                script.terminate()
                script.wait(20)
        print("Python %s (%s)%s" % (version, python, "" if healthy else " -- the daemon never got healthy!"))
        for name, _ in contenders:
            times = sorted(t for t, _ in results[name])
            rss = sorted(r for _, r in results[name])
            print("  %-40s best %6.1f ms, median %6.1f ms, peak RSS %5.1f MB"
                  % (name, times[0] * 1000, times[len(times) // 2] * 1000, rss[len(rss) // 2]))
        print("  %-40s %5.1f MB" % ("idle daemon RSS, bx24ast (installed)", daemon_launcher))
        print("  %-40s %5.1f MB" % ("idle daemon RSS, python3 bx24ast.py", daemon_script))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", help="an interpreter (default: this one and pyenv's oldest)")
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    pythons = args.python or [os.path.realpath(sys.executable)] + sorted(glob.glob(os.path.expanduser(
        "~/.pyenv/versions/3.6.*/bin/python3")))[:1]
    print("calibration %.0f ms; peak RSS by %s" % (calibration(), GNU_TIME or "ru_maxrss (includes the fork)"))
    for python in pythons:
        measure(python, args.runs)


if __name__ == "__main__":
    main()
