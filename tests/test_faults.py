"""Never lose or corrupt a call: the daemon stopped, AMI away, CEL as the ledger.

A whole bx24ast.Daemon runs in a thread against the fake AMI (a real capture) and
the Bitrix24 emulator; the CEL table is written as Asterisk would, row by row as
the served events reach the rows' times. Events sent while bx24ast is not
connected are lost, as with a real Asterisk. Each test checks the portal's final
state: one register, one finish with the right DURATION and STATUS_CODE, the
recording once, the task once, no phantom CALL_ID.
"""
import collections
import logging
import os
import shutil
import sqlite3
import subprocess
import threading
import time

import pytest

import bx24ast
from b24_emulator import Bitrix24Emulator
from conftest import FIXTURES, load_expected, wait_for
from fake_ami import FakeAmiServer, capture_messages

PJSIP = os.path.join(FIXTURES, "asterisk-22.10.1-pjsip")
USERS = {"101": 5, "102": 7, "103": 9}


class CelFeed(object):
    """A cel_sqlite3_custom table filled from a capture's own CEL rows as time passes."""

    def __init__(self, tmp_path, capture):
        self.path = str(tmp_path / "master.db")
        src = sqlite3.connect(os.path.join(capture, "cel.sqlite3"))
        schema = src.execute("SELECT sql FROM sqlite_master WHERE name = 'cel'").fetchone()[0]
        self.columns = [r[1] for r in src.execute("PRAGMA table_info(cel)")]
        self.rows = src.execute("SELECT * FROM cel ORDER BY AcctId").fetchall()
        src.close()
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.execute(schema)
        self.db.commit()
        self.written = 0
        self.base = bx24ast.Capture(capture).wall_clock_base()
        self.lock = threading.Lock()

    def upto(self, wall):
        """Write the rows whose eventtime has come (CEL keeps whole seconds)."""
        when = self.columns.index("eventtime")
        with self.lock:
            while self.written < len(self.rows) and bx24ast.cel_time(self.rows[self.written][when]) <= wall:
                row = self.rows[self.written]
                self.db.execute("INSERT INTO cel VALUES (%s)" % ",".join("?" * len(row)), row)
                self.written += 1
            self.db.commit()

    def upto_event(self, messages, index):
        self.upto(self.base + messages[index][1])

    def everything(self):
        self.upto(float("inf"))

    def follow(self, server, stop):
        """Keep up with what the fake AMI has served, in a thread."""
        def run():
            while not stop.is_set():
                if server.cursor:
                    self.upto_event(server.messages, min(server.cursor, len(server.messages)) - 1)
                stop.wait(0.05)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def close(self):
        self.db.close()


class Service(object):
    """bx24ast.Daemon in a thread, with CEL recovery on the feed (or off)."""

    def __init__(self, tmp_path, ami, emu, capture, cel=None, extra=""):
        text = ("[ami]\nhost = 127.0.0.1\nport = %d\nusername = bx24\nsecret = s3cret\nreconnect_max_delay = 1\n"
                "[bitrix24]\nwebhook_url = %s\ntimeout = 3\nunanswered_retry_seconds = 2\n"
                "[routing]\nagi_listen =\nhttp_listen =\n[crm]\ncallback_window_minutes = 0\n"
                "[cel]\n%s\n[storage]\nstate_dir = %s\n[recordings]\npath = %s\nsettle_seconds = 0\n%s"
                % (ami.port, emu.webhook_url,
                   # the captures are days old: "the last hours" reach back to them
                   "backend = sqlite\nsqlite_path = %s\nrecover_interval_minutes = 0.1\n"
                   "recover_hours_without_state = 2160" % cel.path if cel else
                   "backend = off", tmp_path, os.path.join(capture, "recordings"), extra))
        self.config = bx24ast.Config.from_text(text)
        self.daemon = bx24ast.Daemon(self.config)
        self.thread = threading.Thread(target=self.daemon.run)

    def __enter__(self):
        self.thread.start()
        assert wait_for(lambda: self.daemon.bridge.users.loaded_at and self.daemon.resyncs, 10)
        return self

    def __exit__(self, *exc):
        self.daemon.stop()
        self.thread.join(20)
        self.daemon.bridge.store.close()

    def idle(self):
        bridge = self.daemon.bridge
        return not bridge.outbox.counts().get("pending") and not bridge.crm.awaiting()


def _index_after(messages, needle, nth=1):
    """Index just past the nth event whose first bytes contain needle."""
    seen = 0
    for i, (raw, _t) in enumerate(messages):
        if needle in raw[:40]:
            seen += 1
            if seen == nth:
                return i + 1
    raise AssertionError("%r not in the capture" % needle)


def _portal_calls(emu):
    """EXTERNAL_CALL_ID -> list of CALL_IDs the portal registered for it (phantoms show up)."""
    out = collections.defaultdict(set)
    for e in emu.journal:
        if e["method"] == "telephony.externalcall.register" and e.get("status") == 200:
            out[e["params"].get("EXTERNAL_CALL_ID")].add(e["result"]["CALL_ID"])
    return out


def _check_exactly_once(emu, expected, right_duration=()):
    """One register, one finish with the right status (and DURATION for the listed calls),
    a recording once for answered calls, the missed-call tasks once, no card left open."""
    external = [c for c in expected if c["direction"] != "internal"]
    stats = collections.defaultdict(list)
    for rec in emu.stats.values():
        stats[rec["EXTERNAL_CALL_ID"]].append(rec)
    assert sorted(stats) == sorted(c["linkedid"] for c in external), "lost: %s" % (
        set(c["linkedid"] for c in external) - set(stats))
    assert all(len(v) == 1 for v in stats.values()), "duplicated"
    assert all(len(ids) == 1 for ids in _portal_calls(emu).values()), "a phantom CALL_ID"
    assert not emu.active_calls, "registered and never finished"
    for call in external:
        rec = stats[call["linkedid"]][0]
        answered = call["disposition"] == "ANSWERED"
        assert rec["CALL_FAILED_CODE"] == {"ANSWERED": "200", "NO ANSWER": "304", "BUSY": "486"}.get(
            call["disposition"], "603"), call["linkedid"]
        if answered:
            assert rec["PORTAL_USER_ID"] == USERS[call["final_extension"]], call["linkedid"]
            if call["linkedid"] in right_duration:
                assert abs(rec["CALL_DURATION"] - call["first_bridge_to_hangup_s"]) <= 1, (
                    call["linkedid"], rec["CALL_DURATION"], call["first_bridge_to_hangup_s"])
            if call.get("recording_file"):
                assert emu.record_uploads.get(rec["CALL_ID"]) == 1, call["linkedid"]
        else:
            assert rec["CALL_DURATION"] == 0
        if call["direction"] == "inbound" and call.get("line_source"):
            assert rec["PORTAL_NUMBER"] == call["did"], (call["linkedid"], rec["PORTAL_NUMBER"])
    missed = [c for c in external if c["direction"] == "inbound" and c["disposition"] != "ANSWERED"]
    assert len(emu.tasks) == len(missed)


def test_stopped_mid_talk_and_started_after_the_hang_up_the_call_is_finished_from_cel(tmp_path):
    """SIGTERM (or SIGHUP, an upgrade) while the client talks; the call ends while
    bx24ast is down. It was registered: CEL must finish it, not skip it."""
    capture = os.path.join(PJSIP, "inbound_answered")
    expected = load_expected(capture)["calls"]
    messages = capture_messages(capture)
    talking = _index_after(messages, b"Event: BridgeEnter", 2)
    feed = CelFeed(tmp_path, capture)
    with Bitrix24Emulator() as emu:
        with FakeAmiServer([capture], pause_at=talking) as ami:
            feed.upto_event(messages, talking - 1)
            with Service(tmp_path, ami, emu, capture, feed) as svc:
                assert wait_for(lambda: ami.paused and svc.idle() and emu.active_calls, 20)
        assert not emu.stats
        feed.everything()                    # the call ended while bx24ast was stopped
        with FakeAmiServer([]) as ami:       # Asterisk has no channels any more
            with Service(tmp_path, ami, emu, capture, feed) as svc:
                assert wait_for(lambda: emu.stats and svc.idle(), 30), svc.daemon.bridge.outbox.listing()
        _check_exactly_once(emu, expected, right_duration={expected[0]["linkedid"]})
        assert sum(len(ids) for ids in _portal_calls(emu).values()) == 1
    feed.close()


@pytest.mark.parametrize("with_cel", [True, False], ids=["cel", "no-cel"])
def test_restarted_mid_talk_the_adopted_call_keeps_its_talk_time_line_and_recording(tmp_path, with_cel):
    """SIGHUP/SIGTERM mid-talk and started again at once: the call is adopted from
    CoreShowChannels; its end comes live, its values from CEL (or, without CEL, from
    what the first life kept: the answer time, the line; the recording by its name)."""
    capture = os.path.join(PJSIP, "inbound_answered")
    expected = load_expected(capture)["calls"]
    messages = capture_messages(capture)
    talking = _index_after(messages, b"Event: BridgeEnter", 2)
    feed = CelFeed(tmp_path, capture)
    cel = feed if with_cel else None
    with Bitrix24Emulator() as emu:
        with FakeAmiServer([capture], pause_at=talking) as ami:
            feed.upto_event(messages, talking - 1)
            with Service(tmp_path, ami, emu, capture, cel) as svc:
                assert wait_for(lambda: ami.paused and svc.idle() and emu.active_calls, 20)
            # the second connection gets CoreShowChannels (the call is up), then the rest
            time.sleep(3)       # the talk goes on while bx24ast is away
            stop = threading.Event()
            feed.follow(ami, stop)
            try:
                with Service(tmp_path, ami, emu, capture, cel) as svc:
                    assert wait_for(lambda: ami.finished.is_set() and emu.stats and svc.idle(), 30), \
                        svc.daemon.bridge.outbox.listing()
            finally:
                stop.set()
        if with_cel:
            _check_exactly_once(emu, expected, right_duration={expected[0]["linkedid"]})
        else:
            # the live events came in a burst: the talk time is the 3 s the first life saw
            # begin before the restart, not the instant since the call was adopted
            _check_exactly_once(emu, expected)
            assert list(emu.stats.values())[0]["CALL_DURATION"] >= 2
    feed.close()


def test_ami_away_while_calls_end_loses_no_answer_and_no_talk_time(tmp_path):
    """AMI drops in the middle of a burst and the events of the gap are lost: the calls
    that ended (or were answered) meanwhile are finished from CEL, not as missed."""
    capture = os.path.join(PJSIP, "concurrent_burst")
    expected = load_expected(capture)["calls"]
    messages = capture_messages(capture)
    drop = len(messages) // 2
    feed = CelFeed(tmp_path, capture)
    stop = threading.Event()
    with Bitrix24Emulator() as emu:
        with FakeAmiServer([capture], drop_after=drop, gap=len(messages) // 4, seed=5) as ami:
            feed.follow(ami, stop)
            try:
                with Service(tmp_path, ami, emu, capture, feed) as svc:
                    assert wait_for(lambda: ami.finished.is_set() and ami.connections >= 2, 30)
                    assert wait_for(lambda: len(emu.stats) >= 20 and svc.idle(), 60), \
                        svc.daemon.bridge.outbox.listing()
            finally:
                stop.set()
        # the gap's calls: their end (and maybe their answer) was never seen live
        gap_times = (messages[drop][1], messages[drop + len(messages) // 4][1])
        in_gap = set(c["linkedid"] for c in expected
                     if gap_times[0] <= c["ami_call_start_s"] + c["hungup_at_s"] <= gap_times[1] + 1)
        assert in_gap
        _check_exactly_once(emu, expected, right_duration=in_gap)
    feed.close()


def test_without_cel_a_call_that_ended_while_stopped_is_closed_and_marked_uncertain(tmp_path, caplog):
    caplog.set_level(logging.INFO, "bx24ast")
    capture = os.path.join(PJSIP, "inbound_answered")
    expected = load_expected(capture)["calls"]
    messages = capture_messages(capture)
    talking = _index_after(messages, b"Event: BridgeEnter", 2)
    with Bitrix24Emulator() as emu:
        with FakeAmiServer([capture], pause_at=talking) as ami:
            with Service(tmp_path, ami, emu, capture) as svc:
                assert wait_for(lambda: ami.paused and svc.idle() and emu.active_calls, 20)
        with FakeAmiServer([]) as ami:
            with Service(tmp_path, ami, emu, capture) as svc:
                assert wait_for(lambda: emu.stats and svc.idle(), 30)
                uncertain = svc.daemon.bridge.records.uncertain_since(0)
        assert [r["linkedid"] for r in uncertain] == [expected[0]["linkedid"]]
        rec = list(emu.stats.values())[0]
        # answered (the first life saw it) and finished by the employee who talked
        assert rec["CALL_FAILED_CODE"] == "200" and rec["PORTAL_USER_ID"] == USERS["102"]
        assert not emu.active_calls
        assert "uncertain" in caplog.text


# -- storage faults -------------------------------------------------------------------------

@pytest.fixture(params=[4], ids=lambda mb: "%dMB" % mb)
def small_disk(tmp_path, request):
    """A filesystem of a few MB of its own for the state directory (a tmpfs; needs root)."""
    path = tmp_path / "disk"
    path.mkdir()
    size = "size=%dm" % request.param
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a %d MB tmpfs for the state directory (root needed): %s"
                    % (request.param, proc.stderr.strip()))
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _fill(directory):
    """Take every free byte of the filesystem; returns the filler's path."""
    filler = os.path.join(directory, "filler")
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError:
            pass
    return filler


def test_a_full_disk_keeps_the_calls_in_memory_and_writes_them_when_space_is_back(small_disk):
    from test_crm import Harness, check_scenario
    path = os.path.join(PJSIP, "concurrent_burst")
    with Bitrix24Emulator() as emu:
        with Harness(small_disk, emu, {"storage": {"reserve_mb": 0}},
                     recordings=os.path.join(path, "recordings")) as h:
            assert wait_for(lambda: h.bridge.users.loaded_at, 10)
            filler = _fill(small_disk)
            h.replay(path)
            held = h.bridge.crm.unsaved()
            status = h.bridge.storage_status()
            assert held > 0 and status["error"], status
            beat = {"storage": status}
            assert bx24ast.check_storage(beat).level == "CRITICAL"
            h.bridge.maintain()                       # still full: nothing is dropped
            assert h.bridge.crm.unsaved() >= held
            os.remove(filler)
            assert wait_for(lambda: h.bridge.maintain() or not h.bridge.crm.unsaved(), 10)
            h.wait_idle(timeout=60)
            check_scenario(h, emu, path)
            assert bx24ast.check_storage({"storage": h.bridge.storage_status()}).level == "OK"
            assert len(emu.tasks) == 5


def test_a_small_disk_gives_its_reserve_to_the_calls_and_check_says_so(small_disk):
    from test_crm import Harness, check_scenario
    path = os.path.join(PJSIP, "concurrent_burst")
    with Bitrix24Emulator() as emu:
        with Harness(small_disk, emu, {"storage": {"reserve_mb": 1}},
                     recordings=os.path.join(path, "recordings")) as h:
            assert os.path.exists(os.path.join(small_disk, bx24ast.DiskReserve.NAME))
            assert wait_for(lambda: h.bridge.users.loaded_at, 10)
            filler = _fill(small_disk)
            h.bridge.maintain()                       # the daemon's loop, every 5 s
            assert not os.path.exists(os.path.join(small_disk, bx24ast.DiskReserve.NAME))
            assert bx24ast.check_storage({"storage": h.bridge.storage_status()}).level == "CRITICAL"
            h.replay(path)
            assert h.bridge.crm.unsaved() == 0        # the reserve made room: no write failed
            h.wait_idle(timeout=60)
            check_scenario(h, emu, path)
            os.remove(filler)
            h.bridge.maintain()
            assert bx24ast.check_storage({"storage": h.bridge.storage_status()}).level == "OK"
            assert os.path.exists(os.path.join(small_disk, bx24ast.DiskReserve.NAME))


# -- clock steps --------------------------------------------------------------------------

class JumpingTime(object):
    """bx24ast's view of the time module with a wall clock that can step (NTP, date -s)."""

    def __init__(self):
        self.offset = 0.0

    def time(self):
        return _real_time.time() + self.offset

    def __getattr__(self, name):
        return getattr(_real_time, name)


_real_time = time


def test_a_clock_step_in_the_middle_of_a_call_changes_no_talk_time(tmp_path, monkeypatch):
    capture = os.path.join(PJSIP, "inbound_answered")
    expected = load_expected(capture)["calls"][0]
    messages = capture_messages(capture)
    talking = _index_after(messages, b"Event: BridgeEnter", 2)
    clock = JumpingTime()
    monkeypatch.setattr(bx24ast, "time", clock)
    with Bitrix24Emulator() as emu:
        with FakeAmiServer([capture], speed=2) as ami:
            with Service(tmp_path, ami, emu, capture) as svc:
                assert wait_for(lambda: ami.cursor > talking, 20)
                clock.offset = 3600.0            # the wall clock jumps an hour ahead mid-talk
                assert wait_for(lambda: emu.stats and svc.idle(), 30)
    rec = list(emu.stats.values())[0]
    # played at twice the real speed: 5 s of talk last 2.5 s
    assert abs(rec["CALL_DURATION"] - expected["first_bridge_to_hangup_s"] / 2) <= 1, rec["CALL_DURATION"]


def test_a_clock_step_back_moves_the_waiting_requests_with_it(tmp_path):
    wall = [1000000.0]
    mono = [50.0]
    watch = bx24ast.ClockWatch(wall=lambda: wall[0], mono=lambda: mono[0])
    steady = bx24ast.SteadyClock(wall=lambda: wall[0], mono=lambda: mono[0])
    mono[0] += 10
    wall[0] += 10 - 3600                      # ten seconds pass, and the clock goes back an hour
    assert watch.step() == -3600 and watch.step() == 0.0
    assert steady.now() == 1000010.0 and steady.drift() == -3600
    steady.resync()
    assert steady.now() == wall[0]
    # the daemon moves what waits for a time (a retry, a missed-call task's window)
    config = bx24ast.Config.from_text("[ami]\nusername = bx24\n[bitrix24]\nwebhook_url = http://127.0.0.1:9/rest/1/x/\n"
                                      "[routing]\nagi_listen =\nhttp_listen =\n[cel]\nbackend = off\n"
                                      "[storage]\nstate_dir = %s\n" % tmp_path)
    daemon = bx24ast.Daemon(config)
    outbox = daemon.bridge.outbox
    outbox.add("1.1", "task", "tasks.task.add", {}, bx24ast.PRIORITY_LATER, not_before=time.time() + 300)
    assert not outbox.ready(time.time() - 3600 + 301)    # after the step it would wait an hour more
    daemon._follow_the_clock(-3600.0)
    assert [r.kind for r in outbox.ready(time.time() - 3600 + 301)] == ["task"]
    daemon.bridge.store.close()


def test_a_lost_state_database_duplicates_nothing_bitrix24_already_has(tmp_path, caplog):
    """The state database deleted while stopped: CEL is read from hours back, and the calls
    the portal already has (by EXTERNAL_CALL_ID) are not registered a second time."""
    caplog.set_level(logging.INFO, "bx24ast")
    capture = os.path.join(PJSIP, "inbound_answered")
    expected = load_expected(capture)["calls"]
    feed = CelFeed(tmp_path, capture)
    feed.everything()
    with Bitrix24Emulator() as emu:
        with FakeAmiServer([capture]) as ami:
            with Service(tmp_path, ami, emu, capture, feed) as svc:
                assert wait_for(lambda: ami.finished.is_set() and emu.stats and svc.idle(), 20)
        for name in os.listdir(str(tmp_path)):
            if name.startswith("bx24ast.db"):
                os.remove(str(tmp_path / name))
        with FakeAmiServer([]) as ami:
            with Service(tmp_path, ami, emu, capture, feed) as svc:
                assert wait_for(lambda: "already in Bitrix24" in caplog.text and svc.idle(), 20)
        _check_exactly_once(emu, expected)
        assert len([e for e in emu.journal if e["method"] == "telephony.externalcall.register"]) == 1
    feed.close()


@pytest.mark.parametrize("small_disk", [2], indirect=True, ids=["2MB"])
def test_a_state_directory_on_a_2_mb_filesystem_loses_no_call(small_disk):
    """The WAL grew to the whole disk and every write failed from then on: now it is folded
    back every 400 kB; the 4 MB reserve does not fit, which check says from the start."""
    from test_crm import Harness
    paths = [os.path.join(FIXTURES, d, "concurrent_burst") for d in
             ("asterisk-22.10.1-pjsip", "asterisk-22.10.1", "asterisk-16.30.1-sip")]
    recordings = os.path.join(small_disk, "..", "recordings")
    os.makedirs(recordings)
    for p in paths:
        for f in os.listdir(os.path.join(p, "recordings")):
            shutil.copy(os.path.join(p, "recordings", f), recordings)
    with Bitrix24Emulator() as emu:
        with Harness(small_disk, emu, recordings=recordings) as h:
            h.bridge.maintain()
            assert bx24ast.check_storage({"storage": h.bridge.storage_status()}).level == "CRITICAL"
            for p in paths:
                h.replay(p)
            h.wait_idle(timeout=120)
            assert h.bridge.crm.unsaved() == 0 and h.bridge.store.error is None
            # one emulator for the three bursts (their callers' leads carry over, so the
            # missed calls' owners differ from one burst's own truth): exactly once each
            expected = []
            for p in paths:
                expected.extend(load_expected(p)["calls"])
            _check_exactly_once(emu, expected)
            assert len(emu.stats) == 60 and not h.bridge.outbox.counts().get("parked")
