#!/usr/bin/env python3
"""Faults an operator meets, over a stream of 100 real calls: lost, duplicated, wrong.

The daemon runs as a real process (`bx24ast.py run -f`) against a fake Asterisk that
plays 100 calls of real captures on one clock (3 bursts of 20 and 40 single calls
overlapping, ~40 s at real speed; events sent while bx24ast is not connected are
lost, as with a real Asterisk), a CEL table written row by row as the calls go on,
and the Bitrix24 emulator of tests/. Each fault row starts from an empty state and
prints: calls, lost (no finished call in the portal), duplicated (a second finish,
a second CALL_ID, a recording uploaded twice, an extra task), wrong (STATUS_CODE,
DURATION off by more than 1 s, the wrong employee, a missing recording or task),
and the CPU seconds the daemon used during the outage (portal rows).

Target: 0 lost, 0 duplicated, 0 wrong in every row; CPU during a 10-minute outage < 2 s.

Usage: python3 bench/bench_faults.py [--outages 120,600] [--rows none,kill9,...]
(the disk-full row mounts a tmpfs and needs root; the clock rows step the daemon's own
view of the wall clock, not the machine's)
"""
import argparse
import collections
import glob
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import bx24ast  # noqa: E402
from b24_emulator import Bitrix24Emulator  # noqa: E402
from conftest import FIXTURES, load_expected  # noqa: E402
from fake_ami import FakeAmiServer, capture_messages  # noqa: E402
from test_faults import _fill as fill_disk  # noqa: E402

SCRIPT = os.path.join(ROOT, "bx24ast.py")
USERS = {"101": 5, "102": 7, "103": 9}
BURSTS = ["asterisk-22.10.1-pjsip/concurrent_burst", "asterisk-22.10.1/concurrent_burst",
          "asterisk-16.30.1-sip/concurrent_burst"]
TICK = os.sysconf("SC_CLK_TCK")


def singles(count=40):
    out = []
    for base in ("asterisk-22.10.1-pjsip", "asterisk-22.10.1", "asterisk-16.30.1-sip",
                 "asterisk-22.10.1-live", "asterisk-16.30.1-live"):
        for path in sorted(glob.glob(os.path.join(FIXTURES, base, "*", "expected.json"))):
            name = os.path.basename(os.path.dirname(path))
            if name.startswith("click2call") or name in ("concurrent_burst", "internal_call"):
                continue
            out.append(os.path.dirname(path))
    return out[:count]


_CHANNEL_SEQ = re.compile(r"-([0-9a-f]{8})(?=[;\r,\"'\s)/]|$)")


def unique_channels(text, n):
    """Captures of separate Asterisk runs reuse channel names (PJSIP/101-00000003); played
    at the same time they must not, as on one Asterisk: the capture's number goes into
    the sequence digits."""
    return _CHANNEL_SEQ.sub(lambda m: "-%02x%s" % (n, m.group(1)[2:]), text)


class Stream(object):
    """The calls on one timeline: (stream time, raw event) and CEL rows (stream time, row)."""

    def __init__(self, captures):
        self.events, self.cel, self.expected, self.recordings = [], [], [], []
        self.ends = {}
        offsets = {}
        for n, path in enumerate(captures):
            offsets[path] = 12.0 * n if path.endswith("concurrent_burst") else 0.7 * (n - len(BURSTS))
        for n, path in enumerate(captures, 1):
            msgs = capture_messages(path)
            first = msgs[0][1]
            for i, (raw, t) in enumerate(msgs):
                raw = unique_channels(raw.decode("utf-8", "surrogateescape"), n).encode("utf-8", "surrogateescape")
                self.events.append((offsets[path] + t - first, path, i, raw))
            base = bx24ast.Capture(path).wall_clock_base() + first
            db = sqlite3.connect(os.path.join(path, "cel.sqlite3"))
            cols = [r[1] for r in db.execute("PRAGMA table_info(cel)")]
            for row in db.execute("SELECT * FROM cel ORDER BY AcctId"):
                when = bx24ast.cel_time(row[cols.index("eventtime")]) - base + offsets[path]
                row = tuple(unique_channels(v, n) if isinstance(v, str) else v for v in row[1:])
                self.cel.append((max(0.0, when), row))
            db.close()
            self.columns = cols[1:]
            for c in load_expected(path)["calls"]:
                if c["direction"] == "internal":
                    continue
                self.expected.append(c)
                self.ends[c["linkedid"]] = offsets[path] + c.get("ami_call_start_s", 0) - first + \
                    (c.get("hungup_at_s") or 0)
            if os.path.isdir(os.path.join(path, "recordings")):
                self.recordings.append(os.path.join(path, "recordings"))
        self.events.sort(key=lambda e: (e[0], e[1], e[2]))
        self.cel.sort(key=lambda r: r[0])
        self.length = self.events[-1][0]


class ClockedAmi(FakeAmiServer):
    """Plays the stream in real time whether bx24ast listens or not: what happens while
    no session is open (or while AMI is 'down') is applied to the channel table and lost."""

    def __init__(self, stream):
        FakeAmiServer.__init__(self, [])
        self.messages = [(raw, t) for t, _p, _i, raw in stream.events]
        self.t0 = None
        self.down_until = 0.0
        self.sessions = 0
        self._lock2 = threading.Lock()

    def begin(self):
        self.t0 = time.time()
        threading.Thread(target=self._advance_unheard, daemon=True).start()

    def now(self):
        return 0.0 if self.t0 is None else time.time() - self.t0

    def _advance_unheard(self):
        while not self._stop.is_set() and self.cursor < len(self.messages):
            with self._lock2:
                if self.sessions == 0 or time.time() < self.down_until:
                    while self.cursor < len(self.messages) and self.messages[self.cursor][1] <= self.now():
                        self.table.apply(self.messages[self.cursor][0])
                        self.cursor += 1
            time.sleep(0.02)
        self.finished.set()

    def _session(self, conn):
        if time.time() < self.down_until:
            conn.close()      # Asterisk refuses: AMI is down
            return
        with self._lock2:
            self.sessions += 1
        try:
            FakeAmiServer._session(self, conn)
        finally:
            with self._lock2:
                self.sessions -= 1

    def _stream_some(self, conn, started):
        if time.time() < self.down_until:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return False
        if self.t0 is None:
            return True
        with self._lock2:
            while self.cursor < len(self.messages) and self.messages[self.cursor][1] <= self.now():
                raw = self.messages[self.cursor][0]
                self.table.apply(raw)
                self.cursor += 1
                try:
                    self._send(conn, raw)
                except OSError:
                    return False
        if self.cursor >= len(self.messages):
            self.finished.set()
        return True


class CelWriter(object):
    """cel_sqlite3_custom as time passes: each row once its stream time has come."""

    def __init__(self, path, stream, clock):
        self.path, self.stream, self.clock = path, stream, clock
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE cel (AcctId INTEGER PRIMARY KEY, %s)" % ", ".join(stream.columns))
        db.commit()
        db.close()
        self.stop = threading.Event()

    def run(self):
        db = sqlite3.connect(self.path)
        written = 0
        marks = ",".join("?" * len(self.stream.columns))
        while not self.stop.is_set() and written < len(self.stream.cel):
            now = self.clock()
            while written < len(self.stream.cel) and self.stream.cel[written][0] <= now:
                db.execute("INSERT INTO cel (%s) VALUES (%s)" % (", ".join(self.stream.columns), marks),
                           self.stream.cel[written][1])
                written += 1
            db.commit()
            self.stop.wait(0.05)
        db.close()


# The daemon's own view of the wall clock, stepped an hour forward (SIGUSR1) or back
# (SIGUSR2) as NTP or `date -s` would; its monotonic clock goes on untouched.
CLOCK_SHIM = """
import runpy, signal, sys, time
_real, _offset = time.time, [0.0]
time.time = lambda: _real() + _offset[0]
signal.signal(signal.SIGUSR1, lambda *a: _offset.__setitem__(0, _offset[0] + 3600))
signal.signal(signal.SIGUSR2, lambda *a: _offset.__setitem__(0, _offset[0] - 3600))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class DaemonProcess(object):
    def __init__(self, conf):
        self.conf = conf
        self.proc = None
        self.log = open(conf + ".log", "ab")

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", CLOCK_SHIM, SCRIPT, "-c", self.conf, "run", "-f"],
                                     stdout=subprocess.DEVNULL, stderr=self.log)

    def signal(self, sig):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cpu(self):
        try:
            with open("/proc/%d/stat" % self.proc.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / float(TICK)
        except (OSError, IndexError, ValueError):
            return 0.0


def pending(state):
    """Requests the daemon still has to send (its state database, read-only)."""
    try:
        db = sqlite3.connect("file:%s?mode=ro" % os.path.join(state, "bx24ast.db"), uri=True, timeout=5)
        try:
            return db.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 1


def judge(stream, emu):
    """(lost, duplicated, wrong) against each call's expected.json."""
    stats = collections.defaultdict(list)
    for rec in emu.stats.values():
        stats[rec["EXTERNAL_CALL_ID"]].append(rec)
    ids = collections.defaultdict(set)
    for e in emu.journal:
        if e["method"] == "telephony.externalcall.register" and e.get("status") == 200:
            ids[e["params"].get("EXTERNAL_CALL_ID")].add(e["result"]["CALL_ID"])
    lost = dup = wrong = 0
    details = []
    for call in stream.expected:
        recs = stats.get(call["linkedid"], [])
        if not recs:
            lost += 1
            details.append("lost %s" % call["linkedid"])
            continue
        if len(recs) > 1 or len(ids.get(call["linkedid"], ())) > 1:
            dup += 1
            details.append("duplicated %s" % call["linkedid"])
        rec = recs[0]
        answered = call["disposition"] == "ANSWERED"
        bad = []
        code = {"ANSWERED": "200", "NO ANSWER": "304", "BUSY": "486"}.get(call["disposition"], "603")
        if rec["CALL_FAILED_CODE"] != code:
            bad.append("status %s, not %s" % (rec["CALL_FAILED_CODE"], code))
        if answered and abs(rec["CALL_DURATION"] - call["first_bridge_to_hangup_s"]) > 1:
            bad.append("duration %s, not %s" % (rec["CALL_DURATION"], call["first_bridge_to_hangup_s"]))
        if answered and call["direction"] == "inbound" and rec["PORTAL_USER_ID"] != USERS.get(call["final_extension"]):
            bad.append("user %s" % rec["PORTAL_USER_ID"])
        uploads = emu.record_uploads.get(rec["CALL_ID"], 0)
        if answered and call.get("recording_file") and call.get("recording_in_fixture", True) and uploads != 1:
            if uploads > 1:
                dup += 1
            bad.append("recording uploaded %d times" % uploads)
        if bad:
            wrong += 1
            details.append("wrong %s: %s" % (call["linkedid"], "; ".join(bad)))
    # A missed call gets its task unless the client got through afterwards (a later
    # answered call from the same number may or may not come before the task is sent).
    plan = bx24ast.NumberPlan()
    missed = [c for c in stream.expected if c["direction"] == "inbound" and c["disposition"] != "ANSWERED"]
    excusable = sum(1 for m in missed if any(
        c["disposition"] == "ANSWERED" and c["external_number"] and
        plan.normalize(c["external_number"]) == plan.normalize(m["external_number"] or "") and
        stream.ends[c["linkedid"]] >= stream.ends[m["linkedid"]] for c in stream.expected))
    if len(emu.tasks) > len(missed):
        dup += len(emu.tasks) - len(missed)
        details.append("%d extra task(s)" % (len(emu.tasks) - len(missed)))
    elif len(emu.tasks) < len(missed) - excusable:
        wrong += len(missed) - excusable - len(emu.tasks)
        details.append("%d task(s) missing" % (len(missed) - excusable - len(emu.tasks)))
    if emu.active_calls:
        dup += len(emu.active_calls)
        details.append("%d call(s) registered and never finished" % len(emu.active_calls))
    return lost, dup, wrong, details


def run_row(name, stream, fault, outage=0.0, seed=7):
    work = tempfile.mkdtemp(prefix="bench-faults-")
    state = os.path.join(work, "state")
    os.makedirs(state)
    mounted = False
    if fault == "disk":
        if subprocess.call(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", state]) != 0:
            return name, None
        mounted = True
    recordings = os.path.join(work, "recordings")
    os.makedirs(recordings)
    for d in stream.recordings:
        for f in os.listdir(d):
            shutil.copy(os.path.join(d, f), recordings)
    cel = os.path.join(work, "master.db")
    cpu_outage = None
    with Bitrix24Emulator() as emu:
        ami = ClockedAmi(stream).start()
        writer = CelWriter(cel, stream, ami.now)
        conf = os.path.join(work, "bx24ast.conf")
        with open(conf, "w") as f:
            f.write("[ami]\nhost = 127.0.0.1\nport = %d\nusername = bx24\nsecret = s3cret\nreconnect_max_delay = 1\n"
                    "[bitrix24]\nwebhook_url = %s\n[routing]\nagi_listen =\nhttp_listen =\n"
                    "[crm]\ncallback_window_minutes = 0\n[cel]\nbackend = sqlite\nsqlite_path = %s\n"
                    "recover_interval_minutes = 1\nrecover_hours_without_state = 2160\n"
                    "[storage]\nstate_dir = %s\nreserve_mb = 1\n[recordings]\npath = %s\nsettle_seconds = 1\n"
                    "[log]\nlevel = info\n" % (ami.port, emu.webhook_url, cel, state, recordings))
        daemon = DaemonProcess(conf)
        daemon.start()
        time.sleep(1.5)
        ami.begin()
        threading.Thread(target=writer.run, daemon=True).start()
        rng = random.Random(seed)
        try:
            if fault == "kill9":
                for at in sorted(rng.uniform(1, stream.length) for _ in range(10)):
                    while ami.now() < at:
                        time.sleep(0.05)
                    daemon.signal(signal.SIGKILL)
                    daemon.proc.wait()
                    time.sleep(1.0)
                    daemon.start()
            elif fault == "sigterm":
                while ami.now() < stream.length / 2:
                    time.sleep(0.05)
                daemon.stop()
                time.sleep(0.5)
                daemon.start()
            elif fault == "sighup":
                for at in (stream.length / 4, stream.length / 2, 3 * stream.length / 4):
                    while ami.now() < at:
                        time.sleep(0.05)
                    daemon.signal(signal.SIGHUP)
            elif fault in ("clock_ahead", "clock_back"):
                while ami.now() < stream.length / 2:
                    time.sleep(0.05)
                daemon.signal(signal.SIGUSR1 if fault == "clock_ahead" else signal.SIGUSR2)
            elif fault == "ami_gap":
                while ami.now() < stream.length / 2:
                    time.sleep(0.05)
                ami.down_until = time.time() + 4.0
            elif fault in ("503", "hang", "drop", "slow", "late_answers"):
                while ami.now() < stream.length / 3:
                    time.sleep(0.05)
                # slow: each request is carried out 20 s after it arrived (the client gives
                # up after 15); late_answers: carried out at once, answered after 20 s
                if fault == "slow":
                    emu.delay = 20.0
                elif fault == "late_answers":
                    emu.reply_delay = 20.0
                else:
                    emu.set_outage(fault, outage)
                before = daemon.cpu()
                time.sleep(outage)
                cpu_outage = daemon.cpu() - before
                emu.delay = emu.reply_delay = 0.0
            elif fault == "disk":
                while ami.now() < stream.length / 3:
                    time.sleep(0.05)
                filler = fill_disk(state)
                time.sleep(30)
                os.remove(filler)
            while ami.now() < stream.length + 2:
                time.sleep(0.2)
            # done: the outbox empty (nothing waiting, a retry included) and the portal
            # quiet for a while (a call may still wait for its end from CEL)
            deadline = time.time() + 600
            quiet, last = 0, None
            while time.time() < deadline and quiet < 10:
                now = (len(emu.stats), len(emu.journal))
                quiet = quiet + 1 if now == last and not pending(state) else 0
                last = now
                time.sleep(1)
        finally:
            daemon.stop()
            writer.stop.set()
            ami.stop()
        result = judge(stream, emu)
    if mounted:
        subprocess.call(["umount", "-l", state])
    if os.environ.get("BENCH_KEEP"):
        print("kept %s" % work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return name, result + (cpu_outage,)


ROWS = [("none", "none", 0), ("kill -9 x10", "kill9", 0), ("SIGTERM, restart 0.5 s", "sigterm", 0),
        ("SIGHUP x3", "sighup", 0), ("AMI down 4 s", "ami_gap", 0),
        ("clock steps +1 h", "clock_ahead", 0), ("clock steps -1 h", "clock_back", 0)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--outages", default="120,600", help="portal outage lengths in seconds")
    parser.add_argument("--rows", default="", help="only these faults (none,kill9,sigterm,sighup,ami_gap,"
                                                    "clock_ahead,clock_back,503,hang,drop,slow,late_answers,disk)")
    parser.add_argument("--details", action="store_true", help="list what was wrong")
    args = parser.parse_args()
    stream = Stream([os.path.join(FIXTURES, b) for b in BURSTS] + singles())
    rows = list(ROWS)
    for seconds in [float(x) for x in args.outages.split(",") if x]:
        for mode in ("503", "hang", "drop"):
            rows.append(("portal %s for %.0f min" % (mode, seconds / 60), mode, seconds))
    rows.append(("portal 20 s slow for 2 min", "slow", 120.0))
    rows.append(("answers 20 s late, 2 min", "late_answers", 120.0))
    rows.append(("disk full for 30 s", "disk", 0))
    if args.rows:
        wanted = set(args.rows.split(","))
        rows = [r for r in rows if r[1] in wanted]
    print("stream: %d calls over %.0f s of real time" % (len(stream.expected), stream.length))
    print("%-26s %6s %5s %11s %6s %14s" % ("fault", "calls", "lost", "duplicated", "wrong", "CPU in outage"))
    for title, fault, seconds in rows:
        name, result = run_row(title, stream, fault, seconds)
        if result is None:
            print("%-26s skipped (cannot mount a tmpfs: needs root)" % title)
            continue
        lost, dup, wrong, details, cpu = result
        print("%-26s %6d %5d %11d %6d %14s" % (title, len(stream.expected), lost, dup, wrong,
                                              "-" if cpu is None else "%.2f s" % cpu))
        sys.stdout.flush()
        if args.details:
            for line in details:
                print("    " + line)


if __name__ == "__main__":
    main()
