#!/usr/bin/env python3
"""What a command costs to start: `check --cron` (cron runs it every minute), `replay`
of a capture, and the idle daemon's memory, next to the floor of the same interpreter
(`python3 -I -S -c "import socket, json"`), for each Python given.

Wall time is the best and the median of --runs runs, interleaved across contenders;
memory is the peak RSS of the process (ru_maxrss of the child), the daemon's is its RSS
after it settled. Also printed: the machine's calibration figure (a fixed loop, ms).

Usage: python3 bench/bench_startup.py [--python /usr/bin/python3 --python ~/.pyenv/versions/3.6.15/bin/python3]
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROGRAM = os.path.join(ROOT, "bx24ast.py")
sys.path.insert(0, HERE)
from bench_latency import calibration  # noqa: E402

CAPTURE = os.path.join(ROOT, "tests", "fixtures", "asterisk-22.10.1-pjsip", "inbound_answered")


def timed(argv, env=None):
    """(seconds, peak RSS in MB) of one run of argv."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _pid, _status, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return time.perf_counter() - t0, usage.ru_maxrss / 1024.0


def daemon_rss(python, conf, settle=3.0):
    """RSS (MB) of `run` once it has settled, with nothing to talk to."""
    proc = subprocess.Popen([python, PROGRAM, "run", "-f", "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(settle)
        with open("/proc/%d/status" % proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    finally:
        proc.terminate()
        proc.wait(10)
    return float("nan")


def config(tmp):
    conf = os.path.join(tmp, "bx24ast.conf")
    with open(conf, "w") as f:
        f.write("[ami]\nhost = 127.0.0.1\nport = 1\nusername = bx24\nsecret = x\n[storage]\nstate_dir = %s\n"
                "[routing]\nagi_listen =\nhttp_listen =\n[cel]\nbackend = off\n"
                "[bitrix24]\nwebhook_url = http://127.0.0.1:1/rest/1/x/\ntimeout = 1\n" % tmp)
    return conf


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", help="an interpreter (default: this one and pyenv's oldest)")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    pythons = args.python or [sys.executable] + sorted(glob.glob(os.path.expanduser(
        "~/.pyenv/versions/3.6.*/bin/python3")))[:1]
    tmp = tempfile.mkdtemp(prefix="bench-startup-")
    try:
        conf = config(tmp)
        print("calibration %.0f ms" % calibration())
        for python in pythons:
            version = subprocess.check_output([python, "-c", "import sys; print(sys.version.split()[0])"],
                                              universal_newlines=True).strip()
            contenders = [("floor: -I -S -c 'import socket, json'", [python, "-I", "-S", "-c", "import socket, json"]),
                          ("check --cron", [python, PROGRAM, "check", "--cron", "-c", conf, "--restart-command",
                                            "true", "--timeout", "0.5"]),
                          ("replay a capture", [python, PROGRAM, "replay", CAPTURE])]
            results = dict((name, []) for name, _ in contenders)
            for _ in range(args.runs):
                for name, argv in contenders:     # interleaved: each round runs each contender once
                    results[name].append(timed(argv))
            print("Python %s (%s)" % (version, python))
            for name, _ in contenders:
                times = sorted(t for t, _ in results[name])
                rss = max(r for _, r in results[name])
                print("  %-40s best %6.1f ms, median %6.1f ms, peak RSS %5.1f MB"
                      % (name, times[0] * 1000, times[len(times) // 2] * 1000, rss))
            print("  %-40s %5.1f MB" % ("idle daemon RSS", daemon_rss(python, conf)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
