#!/usr/bin/env python3
"""100,000 calls through the daemon: does anything grow that should not?

The daemon runs as a real process (`bx24ast.py run -f`) against a fake Asterisk that
plays real captures of Asterisk 22 (an answered inbound call through a ring group, a
missed one, an outbound one: 126, 41 and 60 events as Asterisk wrote them, VarSet and
Newexten included) over and over, each copy with its own Uniqueids, channels, bridge
and caller number (from a pool of 2,000, so that callers come back), many calls at
once on the captures' timing sped up (--speed); and the Bitrix24 emulator of tests/ with room for
the load. A new call starts only while fewer than --window calls are unfinished in
the portal and fewer than 3 x --window requests wait in its outbox, so the stream runs
as fast as the daemon reports (missed-call tasks included).

Printed at the start and at every 10,000 calls finished in the portal: the daemon's
RSS (and its peak), threads, open file descriptors, the state database on disk
(file + WAL) and its rows, and the calls per second since the last line; then the
state database's bytes per call kept.

Target: RSS <= 30 MB after 100,000 calls; threads, descriptors and the database flat.

The daemon runs as installed (install.sh --root into a temp tree: the precompiled
module and its launcher); --script runs `python3 bx24ast.py` instead.

Usage: python3 bench/bench_soak.py [--calls 100000] [--every 10000] [--rate 200] [--window 400] [--script]
"""
import argparse
import heapq
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "tests")]
import bx24ast  # noqa: E402
from b24_emulator import Bitrix24Emulator  # noqa: E402
from conftest import FIXTURES  # noqa: E402
from fake_ami import BANNER, capture_messages  # noqa: E402
from bench_startup import install  # noqa: E402

SCRIPT = os.path.join(ROOT, "bx24ast.py")
SCENARIOS = (("inbound_answered", 7), ("inbound_missed", 2), ("outbound_answered", 1))   # name, weight
POOL = 2000


class CallTemplate(object):
    """One capture as chunks of events (those within 50 ms go together) whose call-specific
    parts are slots: the Uniqueid epoch, channel sequence numbers, the bridge id, the number."""

    TOKEN = re.compile(br"(?<![\d.])(1\d{9})(?=\.\d)|(?<=-)([0-9a-f]{8})(?=[;\r,\s/]|$)"
                       br"|([0-9a-f]{8})(?=-[0-9a-f]{4}-[0-9a-f]{4}-)|(9161234567)")

    def __init__(self, path, speed):
        messages = capture_messages(path)
        first = messages[0][1]
        self.chunks = []           # [(seconds from the call's start, [bytes or slot])]
        for raw, t in messages:
            t = (t - first) / speed
            if not self.chunks or t - self.chunks[-1][0] > 0.05:
                self.chunks.append((t, []))
            self.chunks[-1][1].extend(self._split(raw))

    def _split(self, raw):
        out, pos = [], 0
        for m in self.TOKEN.finditer(raw):
            out.append(raw[pos:m.start()])
            if m.group(1):
                out.append(("epoch",))
            elif m.group(2):
                out.append(("seq", int(m.group(2), 16)))
            elif m.group(3):
                out.append(("bridge",))
            else:
                out.append(("number",))
            pos = m.end()
        out.append(raw[pos:])
        return out

    def render(self, index, n):
        """The chunk's bytes for call number n."""
        values = {"epoch": b"%d" % (1100000000 + n), "bridge": b"%08x" % n,
                  "number": b"916%07d" % (n % POOL)}
        parts = []
        for part in self.chunks[index][1]:
            if isinstance(part, bytes):
                parts.append(part)
            elif part[0] == "seq":
                parts.append(b"%08x" % ((n * 64 + part[1]) % 0xffffffff))
            else:
                parts.append(values[part[0]])
        return b"".join(parts)


class SoakAmi(object):
    """The Asterisk side: login, Ping, an empty CoreShowChannels, and the calls' events."""

    def __init__(self, templates, rate, window, calls, finished):
        self.templates, self.rate, self.window, self.calls = templates, rate, window, calls
        self.finished = finished           # () -> calls finished in the portal
        self.backlog = 0                   # requests waiting in the daemon's outbox (set by main)
        self.started = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.conn = None
        self.send_lock = threading.Lock()
        self.stop = threading.Event()
        self.go = threading.Event()       # the calls begin (after the idle sample)
        self.threads = [threading.Thread(target=self._accept, daemon=True),
                        threading.Thread(target=self._stream, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self, data):
        with self.send_lock:
            if self.conn is None:
                return False
            try:
                self.conn.sendall(data)
                return True
            except OSError:
                self.conn = None
                return False

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        parser = bx24ast.AmiParser(accept_actions=True)
        parser.reset(expect_banner=False)
        conn.sendall(BANNER)
        conn.settimeout(0.5)
        while not self.stop.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            for msg in parser.feed(data):
                action, aid = (msg.get("Action") or "").lower(), msg.get("ActionID") or ""
                reply = "Response: Success\r\nActionID: %s\r\n" % aid
                if action == "login":
                    conn.sendall((reply + "Message: Authentication accepted\r\n\r\n").encode())
                    with self.send_lock:
                        self.conn = conn
                    self._send(b"Event: FullyBooted\r\nPrivilege: system,all\r\nUptime: 100\r\n"
                               b"LastReload: 0\r\nStatus: Fully Booted\r\n\r\n")
                    continue
                if action == "coreshowchannels":
                    reply += ("EventList: start\r\nMessage: Channels will follow\r\n\r\n"
                              "Event: CoreShowChannelsComplete\r\nActionID: %s\r\nEventList: Complete\r\n"
                              "ListItems: 0\r\n" % aid)
                elif action == "ping":
                    reply += "Ping: Pong\r\nTimestamp: %.6f\r\n" % time.time()
                elif action == "command":
                    reply += "Message: Command output follows\r\nOutput: Asterisk 22.10.1\r\n"
                with self.send_lock:
                    try:
                        conn.sendall((reply + "\r\n").encode())
                    except OSError:
                        break
        with self.send_lock:
            if self.conn is conn:
                self.conn = None
        conn.close()

    def _stream(self):
        while not self.go.is_set() and not self.stop.is_set():
            time.sleep(0.05)
        picks = [t for t, weight in self.templates for _ in range(weight)]
        due = []                          # (time, call number, chunk index)
        next_start = time.time()
        while not self.stop.is_set() and (self.started < self.calls or due):
            now = time.time()
            while (self.started < self.calls and next_start <= now and self.backlog < 3 * self.window
                   and self.started - self.finished() < self.window):
                heapq.heappush(due, (now, self.started, 0))
                self.started += 1
                next_start += 1.0 / self.rate
            if next_start < now - 1:
                next_start = now          # held back by the window: no burst to catch up
            out = []
            while due and due[0][0] <= now:
                _t, n, i = heapq.heappop(due)
                template = picks[n % len(picks)]
                out.append(template.render(i, n))
                if i + 1 < len(template.chunks):
                    start = _t - template.chunks[i][0]
                    heapq.heappush(due, (start + template.chunks[i + 1][0], n, i + 1))
            if out:
                self._send(b"".join(out))
            time.sleep(0.005)

    def close(self):
        self.stop.set()
        self.sock.close()
        for t in self.threads:
            t.join(5)


def proc_numbers(pid):
    with open("/proc/%d/status" % pid) as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    kb = lambda key: int(status[key].split()[0])   # noqa: E731
    return {"rss": kb("VmRSS") / 1024.0, "peak": kb("VmHWM") / 1024.0,
            "threads": len(os.listdir("/proc/%d/task" % pid)), "fds": len(os.listdir("/proc/%d/fd" % pid))}


def database(state):
    path = os.path.join(state, "bx24ast.db")
    size = sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    try:
        db = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=10)
        try:
            calls = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
            rows = dict(db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())
        finally:
            db.close()
    except sqlite3.Error:
        calls, rows = 0, {}
    return size, calls, rows


class Portal(object):
    """The emulator, drained as it goes: the soak measures the daemon, not the emulator's journal."""

    def __init__(self, emu):
        self.emu, self.done, self.tasks = emu, 0, 0

    def finished(self):
        with self.emu.lock:
            self.done += len(self.emu.stats)
            self.tasks += len(self.emu.tasks)
            self.emu.stats.clear()
            self.emu.tasks.clear()
            del self.emu.journal[:]
            del self.emu.activities[:]
            self.emu.record_uploads.clear()
        return self.done


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100000)
    parser.add_argument("--every", type=int, default=10000)
    parser.add_argument("--rate", type=float, default=200.0, help="new calls a second, at most")
    parser.add_argument("--window", type=int, default=400, help="calls unfinished in the portal, at most")
    parser.add_argument("--speed", type=float, default=8.0, help="the captures' timing, this many times faster")
    parser.add_argument("--python", default=os.path.realpath(sys.executable), help="the interpreter that runs the daemon")
    parser.add_argument("--script", action="store_true",
                        help="run python3 bx24ast.py, not the launcher install.sh writes (precompiled)")
    args = parser.parse_args()
    base = os.path.join(FIXTURES, "asterisk-22.10.1-pjsip")
    templates = [(CallTemplate(os.path.join(base, name), args.speed), weight) for name, weight in SCENARIOS]
    work = tempfile.mkdtemp(prefix="bench-soak-")
    state = os.path.join(work, "state")
    version = subprocess.check_output([args.python, "-c", "import sys; print(sys.version.split()[0])"])
    print("daemon on Python %s (%s); %d calls, at most %.0f new a second and %d unfinished, captures played %.0fx"
          % (version.decode().strip(), "python3 bx24ast.py" if args.script else "installed: the bx24ast launcher",
             args.calls, args.rate, args.window, args.speed))
    proc = None
    with Bitrix24Emulator(rate=100.0, burst=400) as emu:
        portal = Portal(emu)
        ami = SoakAmi(templates, args.rate, args.window, args.calls, portal.finished)
        conf = os.path.join(work, "bx24ast.conf")
        with open(conf, "w") as f:
            f.write("[ami]\nhost = 127.0.0.1\nport = %d\nusername = bx24\nsecret = s3cret\n"
                    "[bitrix24]\nwebhook_url = %s\nrate = 100\nburst = 400\n[routing]\nagi_listen =\n"
                    "http_listen =\n[crm]\ncallback_window_minutes = 0\n[cel]\nbackend = off\n"
                    "[storage]\nstate_dir = %s\nreserve_mb = 1\n[recordings]\nattach = no\n[log]\nlevel = warning\n"
                    % (ami.port, emu.webhook_url, state))
        log = open(os.path.join(work, "daemon.log"), "wb")
        command = [args.python, SCRIPT] if args.script else [install(args.python, os.path.join(work, "tree"))]
        proc = subprocess.Popen(command + ["-c", conf, "run", "-f"], stdout=subprocess.DEVNULL, stderr=log)
        try:
            while ami.conn is None and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(1.0)
            rows = []

            def sample(label, since):
                p = proc_numbers(proc.pid)
                size, calls, outbox = database(state)
                rows.append((label, p, size, calls))
                rate = "" if since is None else "; %.0f calls/s" % (args.every / (time.time() - since))
                print("%-13s RSS %5.1f MB (peak %5.1f), %2d threads, %2d fds; state db %6.2f MB, %6d calls, "
                      "outbox %s%s" % (label, p["rss"], p["peak"], p["threads"], p["fds"], size / 1048576.0,
                                       calls, dict(outbox), rate))
                sys.stdout.flush()

            sample("idle", None)
            ami.go.set()
            mark, t_mark = args.every, time.time()
            while portal.finished() < args.calls and proc.poll() is None:
                ami.backlog = database(state)[2].get("pending", 0)
                if portal.done >= mark:
                    sample("%d calls" % mark, t_mark)
                    mark, t_mark = mark + args.every, time.time()
                time.sleep(0.2)
            if proc.poll() is not None:
                print("the daemon died: see %s" % os.path.join(work, "daemon.log"))
                return 1
            if mark <= args.calls:
                sample("%d calls" % args.calls, t_mark)
            size, calls, _ = database(state)
            print("state database: %d bytes for %d calls kept = %.0f B per call; %d missed-call tasks"
                  % (size, calls, size / float(max(calls, 1)), portal.tasks))
        finally:
            ami.close()
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    if os.environ.get("BENCH_KEEP"):
        print("kept %s" % work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
