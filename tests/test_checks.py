"""`bx24ast.py check`: Nagios exit codes, the lines it prints, --cron."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import bx24ast
from b24_emulator import Bitrix24Emulator
from conftest import FIXTURES, ROOT, wait_for
from fake_ami import FakeAmiServer

SCRIPT = os.path.join(ROOT, "bx24ast.py")
CEL_DB = os.path.join(FIXTURES, "asterisk-22.10.1-pjsip", "inbound_answered", "cel.sqlite3")


def fresh_cel(tmp_path, age=60):
    """A copy of a real CEL database whose newest event is `age` seconds old."""
    path = str(tmp_path / "master.db")
    shutil.copy(CEL_DB, path)
    db = sqlite3.connect(path)
    db.execute("INSERT INTO cel (eventtype, eventtime, uniqueid, linkedid) VALUES ('CHAN_START', ?, '1.1', '1.1')",
               (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - age)),))
    db.commit()
    db.close()
    return path


def write_config(tmp_path, emu=None, ami=None, cel=None, webhook=None):
    text = "[ami]\nhost = 127.0.0.1\nport = %d\nusername = bx24\nsecret = s3cret\nreconnect_max_delay = 1\n" % (
        ami.port if ami else 1)
    if emu is not None or webhook:
        text += "[bitrix24]\nwebhook_url = %s\ntimeout = 3\n" % (webhook or emu.webhook_url)
    text += "[routing]\nagi_listen =\nhttp_listen =\n"
    text += "[cel]\nbackend = sqlite\nsqlite_path = %s\n" % cel if cel else "[cel]\nbackend = off\n"
    text += "[storage]\nstate_dir = %s\n" % tmp_path
    path = tmp_path / "bx24ast.conf"
    path.write_text(text)
    return str(path)


def check(config, *extra):
    proc = subprocess.run([sys.executable, SCRIPT, "-c", config, "check"] + list(extra),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    return proc.returncode, proc.stdout


class Running(object):
    """The daemon in a thread of this process (its heartbeat carries our pid)."""

    def __init__(self, config_path):
        self.daemon = bx24ast.Daemon(bx24ast.Config.load(config_path))
        self.thread = threading.Thread(target=self.daemon.run)

    def __enter__(self):
        self.thread.start()
        state = self.daemon.config.get("storage", "state_dir")
        assert wait_for(lambda: (bx24ast.Heartbeat(state).read() or {}).get("ami", {}).get("connected"), 15)
        return self

    def __exit__(self, *exc):
        self.daemon.stop()
        self.thread.join(20)
        if self.daemon.bridge is not None:
            self.daemon.bridge.store.close()


def test_all_ok_prints_a_summary_and_one_line_per_check(tmp_path):
    with Bitrix24Emulator() as emu, FakeAmiServer() as ami:
        config = write_config(tmp_path, emu, ami, fresh_cel(tmp_path))
        with Running(config):
            code, out = check(config)
            lines = out.splitlines()
            assert code == 0, out
            assert lines[0] == "BX24AST OK - 6 checks passed"
            assert [l.split(":")[0] for l in lines[1:]] == ["OK daemon", "OK ami", "OK bitrix24", "OK outbox",
                                                            "OK cel", "OK storage"]
            assert "connected to 127.0.0.1:%d" % ami.port in lines[2]
            # --cron is silent when all is well
            code, out = check(config, "--cron", "--restart-command", "false")
            assert code == 0 and out == ""


def test_cron_takes_the_services_view_of_the_portal_instead_of_a_request_of_its_own(tmp_path):
    with Bitrix24Emulator() as emu, FakeAmiServer() as ami:
        config = write_config(tmp_path, emu, ami, fresh_cel(tmp_path))
        with Running(config) as running:
            state = running.daemon.config.get("storage", "state_dir")
            assert wait_for(lambda: running.daemon.bridge.client.last_answer_at, 10)
            bx24ast.Heartbeat(state).write(running.daemon.status())
            probes = len(emu.calls_by_method("profile"))
            code, out = check(config, "--cron", "--restart-command", "false")
            assert (code, out) == (0, "")
            assert len(emu.calls_by_method("profile")) == probes, "cron asked the portal itself"
            code, out = check(config)
            assert code == 0 and len(emu.calls_by_method("profile")) == probes + 1, "an admin's check probes the portal"


def test_cron_reports_an_outage_the_service_is_in(tmp_path):
    config = bx24ast.Config.load(write_config(tmp_path, webhook="http://127.0.0.1:1/rest/1/abc/"))
    now = time.time()
    beat = {"pid": os.getpid(), "time": now, "bitrix24": {
        "outage": {"failing_since": now - 300, "failures": 12, "last_error": "HTTP 503"}, "last_answer_at": now - 310}}
    result = bx24ast.check_bitrix24(config, beat, probe=False, now=now)
    assert result.level == "CRITICAL"
    assert str(result.message) == "the service cannot reach the portal for 5 minutes (12 attempts): HTTP 503"
    beat["bitrix24"] = {"alert": "QUERY_LIMIT_EXCEEDED for 2 minutes", "last_answer_at": now - 5}
    assert bx24ast.check_bitrix24(config, beat, probe=False, now=now).level == "WARNING"
    beat["bitrix24"] = {"last_answer_at": now - 42}
    result = bx24ast.check_bitrix24(config, beat, probe=False, now=now)
    assert (result.level, str(result.message)) == \
        ("OK", "reachable (http://127.0.0.1:1/rest/1/***/): the service's last answer 42 seconds ago")
    # nothing heard for over an hour (or no service): cron asks the portal itself
    beat["bitrix24"] = {"last_answer_at": now - 4000}
    result = bx24ast.check_bitrix24(config, beat, probe=False, now=now, timeout=1)
    assert result.level == "CRITICAL" and "cannot reach the portal" in str(result.message)
    assert bx24ast.check_bitrix24(config, None, probe=False, now=now, timeout=1).level == "CRITICAL"


def test_warnings_parked_requests_and_an_old_cel(tmp_path):
    with Bitrix24Emulator() as emu, FakeAmiServer() as ami:
        config = write_config(tmp_path, emu, ami, fresh_cel(tmp_path, age=3 * 3600))
        with Running(config) as running:
            outbox = running.daemon.bridge.outbox
            outbox.add("1.1", "finish", "telephony.externalcall.finish", {"CALL_ID": "x"}, bx24ast.PRIORITY_FINISH)
            outbox.park(outbox.listing()[0], "CALL_ID not found")
            code, out = check(config)
        assert code == 1, out
        assert out.startswith("BX24AST WARNING - outbox: 1 request(s) given up")
        assert "WARNING outbox: 1 request(s) given up (parked) -> bx24ast.py outbox list" in out
        assert "WARNING cel: no CEL event written in the last 1 hour" in out


def test_critical_when_the_portal_is_unreachable_or_cel_is_off(tmp_path):
    with FakeAmiServer() as ami:
        sock = __import__("socket").socket()
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
        sock.close()
        config = write_config(tmp_path, ami=ami, webhook="http://127.0.0.1:%d/rest/1/abc/" % dead_port)
        with Running(config):
            started = time.time()
            code, out = check(config)
            assert time.time() - started < 30
        assert code == 2, out
        assert "CRITICAL bitrix24: Bitrix24 profile: cannot reach the portal" in out
        assert "WARNING cel: recovery off ([cel] backend = off)" in out


def test_a_dead_daemon_is_critical_and_cron_restarts_it(tmp_path):
    config = write_config(tmp_path)
    code, out = check(config)
    assert code == 2 and "CRITICAL daemon: never ran on %s" % tmp_path in out
    assert "UNKNOWN ami: the daemon is not running" in out
    # a heartbeat left by a process that is gone
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with open(str(tmp_path / "heartbeat.json"), "w") as f:
        json.dump({"pid": proc.pid, "time": time.time() - 5, "started_at": time.time() - 100,
                   "ami": {"connected": True, "host": "127.0.0.1", "port": 5038}}, f)
    marker = tmp_path / "restarted"
    code, out = check(config, "--cron", "--restart-command", "touch %s" % marker)
    assert code == 2 and marker.exists()
    assert "CRITICAL daemon: pid %d is gone" % proc.pid in out
    assert "ACTION restarted the service: touch %s (exit 0)" % marker in out
    # a hung one (alive, but no heartbeat for minutes) is restarted too
    marker.unlink()
    with open(str(tmp_path / "heartbeat.json"), "w") as f:
        json.dump({"pid": os.getpid(), "time": time.time() - 600, "started_at": time.time() - 900}, f)
    code, out = check(config, "--cron", "--restart-command", "touch %s" % marker)
    assert "is hung: last heartbeat 10 minutes ago" in out and marker.exists()
    # stopped on purpose by the admin: reported, not restarted
    marker.unlink()
    with open(str(tmp_path / "heartbeat.json"), "w") as f:
        json.dump({"pid": os.getpid(), "time": time.time(), "stopped_at": time.time()}, f)
    code, out = check(config, "--cron", "--restart-command", "touch %s" % marker)
    assert code == 2 and "CRITICAL daemon: stopped at" in out and not marker.exists()
    assert "ACTION" not in out


def test_a_broken_configuration_is_unknown(tmp_path):
    path = tmp_path / "bad.conf"
    path.write_text("[ami]\nport = many\n")
    code, out = check(str(path))
    assert code == 3 and out.startswith("BX24AST UNKNOWN - configuration:") and "[ami] port" in out


def test_calls_at_risk_turn_the_outbox_check_to_warning(tmp_path):
    """Registered and never finished for longer than a call lasts, or finished with
    guessed values: check says so (it said OK while calls were lost)."""
    config = bx24ast.Config.load(write_config(tmp_path))
    store = bx24ast.StateStore.open_dir(str(tmp_path))
    records = bx24ast.CallRecords(store)
    records.update("1.1", source="live", started_at=time.time() - 13 * 3600, call_id="c1")
    records.update("2.2", source="live", started_at=time.time() - 60, ended_at=time.time(),
                   uncertain="ended while bx24ast was not connected to Asterisk")
    store.close()
    result = bx24ast.check_outbox(config)
    assert result.level == "WARNING"
    assert "1 call(s) registered over 12 hours ago and never finished (1.1)" in result.message
    assert "1 call(s) in the last 24 h finished with uncertain values (2.2" in result.message


def test_a_sender_that_sends_nothing_is_critical(tmp_path):
    config = bx24ast.Config.load(write_config(tmp_path))
    store = bx24ast.StateStore.open_dir(str(tmp_path))
    bx24ast.Outbox(store).add("1.1", "register", "telephony.externalcall.register", {}, bx24ast.PRIORITY_CARD)
    store.close()
    now = time.time() + 600
    beat = {"pid": os.getpid(), "time": now, "started_at": now - 900,
            "bitrix24": {"last_sent_at": now - 900, "outage": {"failing_since": None}}}
    assert bx24ast.check_outbox(config, now, beat=beat).level == "CRITICAL"
    # the portal being away is the bitrix24 check's business, not a stuck sender
    beat["bitrix24"]["outage"]["failing_since"] = now - 300
    assert bx24ast.check_outbox(config, now, beat=beat).level == "WARNING"


def test_storage_check_reports_failed_writes_and_a_full_disk():
    now = time.time()
    assert bx24ast.check_storage({"storage": {"error": None, "unsaved_events": 0, "free_mb": 900.0,
                                              "low_since": None}}, now).level == "OK"
    failing = bx24ast.check_storage({"storage": {"error": "database or disk is full", "since": now - 30,
                                                 "unsaved_events": 3, "free_mb": 0.0}}, now)
    assert failing.level == "CRITICAL" and "database or disk is full" in failing.message
    assert "3 call event(s) held in memory" in failing.message
    low = bx24ast.check_storage({"storage": {"error": None, "unsaved_events": 0, "free_mb": 1.5,
                                             "low_since": now, "reserve_mb": 4}}, now)
    assert low.level == "CRITICAL" and "almost full" in low.message
    assert bx24ast.check_storage({"stopped_at": now, "storage": {}}, now) is None


def test_check_lists_every_pbx_and_its_cel(tmp_path):
    with Bitrix24Emulator() as emu, FakeAmiServer() as office, FakeAmiServer() as branch:
        config = write_config(tmp_path, emu, office, fresh_cel(tmp_path))
        with open(config, "a") as f:
            # the branch's CEL is a copy too, its newest event an hour and a half old
            f.write("[ami:branch]\nhost = 127.0.0.1\nport = %d\nusername = bx24\nsecret = s3cret\n"
                    "[cel:branch]\nbackend = sqlite\nsqlite_path = %s\n"
                    % (branch.port, fresh_cel(tmp_path / "..", age=5400)))
        with Running(config) as running:
            state = running.daemon.config.get("storage", "state_dir")
            assert wait_for(lambda: all(p["connected"] for p in
                                        (bx24ast.Heartbeat(state).read() or {}).get("pbxs", [{}, {}])), 15)
            code, out = check(config)
            lines = out.splitlines()
            assert code == 1, out      # the branch's CEL is old
            assert [l.split(":")[0] for l in lines[1:]] == ["OK daemon", "OK ami", "OK ami", "OK bitrix24",
                                                            "OK outbox", "OK cel", "WARNING cel", "OK storage"]
            assert "connected to 127.0.0.1:%d (branch)" % branch.port in lines[3]
            assert lines[7].startswith("WARNING cel: branch: ")
            branch.stop()
            assert wait_for(lambda: not (bx24ast.Heartbeat(state).read() or {}).get("pbxs", [{}, {"connected": 1}])[1]
                            .get("connected"), 20)
            code, out = check(config)
            assert code == 2 and "CRITICAL ami: not connected to 127.0.0.1:%d (branch)" % branch.port in out
            assert "check [ami:branch] host/port/username/secret" in out


def test_hooks_check_tells_a_broken_file_and_failing_hooks():
    config = bx24ast.Config.from_text("[hooks]\nfile = /etc/bx24ast/hooks.py\n")
    now = time.time()
    beat = {"pid": os.getpid(), "time": now, "hooks": {"file": "/etc/bx24ast/hooks.py", "loaded": ["need_registration"],
                                                       "load_error": None, "errors": {}}}
    result = bx24ast.check_hooks(config, beat)
    assert (result.level, str(result.message)) == ("OK", "/etc/bx24ast/hooks.py: need_registration loaded")
    beat["hooks"]["errors"] = {"process_final_params": 3}
    result = bx24ast.check_hooks(config, beat)
    assert result.level == "WARNING" and "process_final_params failed 3 time(s)" in str(result.message)
    beat["hooks"]["load_error"] = "SyntaxError: invalid syntax (hooks.py, line 2)"
    result = bx24ast.check_hooks(config, beat)
    assert result.level == "WARNING" and "cannot be loaded (SyntaxError" in str(result.message)
    assert "hooks test" in str(result.advice)
    # no hooks file, or no daemon: no line
    assert bx24ast.check_hooks(bx24ast.Config.defaults(), beat) is None
    assert bx24ast.check_hooks(config, None) is None
    # the Russian results page has every word of it
    t = bx24ast.WizardLanguage("ru")
    assert "не загружается" in t.text(result.message) and "хуки" == t["check_hooks"]
