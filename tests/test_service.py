"""The foreground daemon and the capture commands as real processes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FIXTURES, ROOT, load_expected, wait_for
from fake_ami import FakeAmiServer
from test_ami import PJSIP, _compare, _expected

SCRIPT = os.path.join(ROOT, "bx24ast.py")


def _config(tmp_path, server):
    path = tmp_path / "bx24ast.conf"
    path.write_text("[ami]\nhost = 127.0.0.1\nport = %d\nusername = bx24\nsecret = s3cret\n"
                    "reconnect_max_delay = 1\n[storage]\nstate_dir = %s\n" % (server.port, tmp_path))
    return str(path)


def test_run_logs_each_call_lifecycle_and_stops_on_sigterm(tmp_path):
    names = ["inbound_answered", "blind_transfer", "outbound_answered"]
    with FakeAmiServer([os.path.join(PJSIP, n) for n in names]) as server:
        proc = subprocess.Popen([sys.executable, SCRIPT, "-c", _config(tmp_path, server), "run", "-f"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        try:
            assert server.finished.wait(20)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    assert "logged in to 127.0.0.1" in err and "bx24ast stopped" in err
    lines = [l for l in err.splitlines() if " call " in l]
    assert any("call 1795667003.0 ringing direction=inbound number=+79161234567 did=74951234567 "
               "extension=101" in l for l in lines)
    assert any("call 1795667003.0 answered" in l and "extension=102" in l for l in lines)
    assert any("call 1795667081.15 transferred" in l and "extension=103" in l for l in lines)
    assert any("call 1795667032.8 ended direction=outbound number=+79161234567" in l
               and "disposition=ANSWERED" in l for l in lines)
    assert all("call " + lid in err for lid in ("1795667003.0", "1795667081.15", "1795667032.8"))


def test_record_ami_then_replay_gives_the_same_calls(tmp_path):
    names = ["inbound_queue", "click2call_originate"]
    out_path = str(tmp_path / "ami.log")
    with FakeAmiServer([os.path.join(PJSIP, n) for n in names], speed=50.0) as server:
        proc = subprocess.Popen([sys.executable, SCRIPT, "-c", _config(tmp_path, server), "record-ami",
                                 "-o", out_path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert server.finished.wait(20)
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0
    with open(out_path, "rb") as f:
        assert f.read(22) == b"Asterisk Call Manager/"
    sidecar = [json.loads(l) for l in open(str(tmp_path / "ami.timestamps.jsonl"))]
    assert sidecar[0]["offset"] == 0 and all("wall" in r and "t" in r for r in sidecar)
    assert sum(r["len"] for r in sidecar) == os.path.getsize(out_path)
    rows = subprocess.check_output([sys.executable, SCRIPT, "replay", out_path], universal_newlines=True)
    got = [json.loads(l) for l in rows.splitlines()]
    _compare(got, _expected(names))
    # the server played the calls 50 times faster; talk time follows
    queue = [r for r in got if r["linkedid"] == "1795667065.12"][0]
    assert queue["billsec"] <= 1 and queue["started_at"].startswith("20")


def test_replay_without_sidecar_has_no_times(tmp_path):
    src = os.path.join(PJSIP, "inbound_answered", "ami.log")
    dst = tmp_path / "bare.log"
    dst.write_bytes(open(src, "rb").read())
    rows = subprocess.check_output([sys.executable, SCRIPT, "replay", str(dst)], universal_newlines=True)
    row = json.loads(rows)
    assert row["answered_by"] == "102" and row["started_at"] is None and row["billsec"] is None


def test_replay_of_a_missing_capture_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "replay", str(tmp_path / "nothing")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert proc.returncode == 1 and "no capture" in proc.stderr


@pytest.mark.parametrize("half", [600, 1500], ids=["while-ringing", "while-ending"])
def test_kill_9_in_the_middle_of_a_burst_loses_and_duplicates_nothing(tmp_path, half):
    """A real `bx24ast.py run`, killed with SIGKILL while its outbox is busy, then
    started again: the portal ends with exactly one finished call per call."""
    import sqlite3
    from b24_emulator import Bitrix24Emulator
    path = os.path.join(PJSIP, "concurrent_burst")
    expected = load_expected(path)["calls"]
    with Bitrix24Emulator(reply_delay=0.4) as emu, FakeAmiServer([path], pause_at=half, seed=21) as server:
        conf = tmp_path / "bx24ast.conf"
        conf.write_text("[ami]\nhost = 127.0.0.1\nport = %d\nusername = bx24\nsecret = s3cret\n"
                         "reconnect_max_delay = 1\n[bitrix24]\nwebhook_url = %s\ntimeout = 3\n"
                         "[routing]\nagi_listen =\nhttp_listen =\n[crm]\ncallback_window_minutes = 0\n[storage]\nstate_dir = %s\n[recordings]\npath = %s\nsettle_seconds = 0\n"
                         % (server.port, emu.webhook_url, tmp_path, os.path.join(path, "recordings")))
        db = str(tmp_path / "bx24ast.db")

        def outbox_counts():
            try:
                con = sqlite3.connect(db, timeout=5)
                rows = dict(con.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())
                con.close()
                return rows
            except sqlite3.Error:
                return {}

        def start():
            return subprocess.Popen([sys.executable, SCRIPT, "-c", str(conf), "run", "-f"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first = start()
        try:
            deadline = time.time() + 30
            while time.time() < deadline:
                counts = outbox_counts()
                if server.paused and counts.get("pending", 0) >= 1:
                    break
                time.sleep(0.01)
            assert server.paused and counts.get("pending", 0) >= 1, counts
            # kill while a request is done by the portal but not yet answered
            time.sleep(0.1)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
            first.stderr.close()
        second = start()
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                if server.finished.is_set() and len(emu.stats) >= 20 and not emu.active_calls \
                        and not outbox_counts().get("pending"):
                    break
                time.sleep(0.1)
            second.send_signal(signal.SIGTERM)
            _, err = second.communicate(timeout=15)
        finally:
            if second.poll() is None:
                second.kill()
                second.communicate()
    assert second.returncode == 0, err[-2000:]
    per_call = {}
    for rec in emu.stats.values():
        per_call.setdefault(rec["EXTERNAL_CALL_ID"], []).append(rec)
    assert sorted(per_call) == sorted(c["linkedid"] for c in expected), set(c["linkedid"] for c in expected) - set(per_call)
    assert all(len(v) == 1 for v in per_call.values()), [k for k, v in per_call.items() if len(v) > 1]
    assert not emu.active_calls, "a registered call was never finished"
    registered = {}
    for entry in emu.journal:
        if entry["method"] == "telephony.externalcall.register" and entry.get("status") == 200:
            registered.setdefault(entry["params"]["EXTERNAL_CALL_ID"], set()).add(entry["result"]["CALL_ID"])
    assert all(len(ids) == 1 for ids in registered.values()), "a register was repeated with a new CALL_ID"
    missed = [c["linkedid"] for c in expected if c["disposition"] != "ANSWERED"]
    assert len(emu.tasks) == len(missed)
    assert not outbox_counts().get("parked")


def test_replay_uses_timestamp_headers_when_there_is_no_sidecar(tmp_path):
    """timestampevents = yes in manager.conf: every event carries its own time."""
    src = os.path.join(PJSIP, "inbound_answered")
    data = open(os.path.join(src, "ami.log"), "rb").read()
    times = [json.loads(l) for l in open(os.path.join(src, "ami.timestamps.jsonl"))]
    out, pos = [], 0
    for rec in times:
        chunk = data[rec["offset"]:rec["offset"] + rec["len"]]
        stamp = ("\r\nTimestamp: %.6f" % (1795667003.0 + rec["t"])).encode()
        out.append(chunk.replace(b"\r\nPrivilege:", stamp + b"\r\nPrivilege:"))
    bare = tmp_path / "stamped.log"
    bare.write_bytes(b"".join(out))
    row = json.loads(subprocess.check_output([sys.executable, SCRIPT, "replay", str(bare)],
                                             universal_newlines=True))
    assert row["billsec"] == 5 and row["started_at"].startswith("2026-11-26T")


def _start(config_path):
    return subprocess.Popen([sys.executable, SCRIPT, "-c", config_path, "run", "-f"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


def _heartbeat(tmp_path):
    try:
        with open(str(tmp_path / "heartbeat.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def test_one_daemon_per_state_dir_and_its_heartbeat(tmp_path):
    with FakeAmiServer() as server:
        config = _config(tmp_path, server)
        first = _start(config)
        try:
            assert wait_for(lambda: (_heartbeat(tmp_path) or {}).get("ami", {}).get("connected"), 15)
            beat = _heartbeat(tmp_path)
            assert beat["pid"] == first.pid and beat["ami"]["host"] == "127.0.0.1"
            second = _start(config)
            out, err = second.communicate(timeout=15)
            assert second.returncode == 1
            assert "another bx24ast (pid %d) already runs on %s" % (first.pid, tmp_path) in err
            assert first.poll() is None
        finally:
            _out, err = _stop(first)
        assert first.returncode == 0, err
        assert _heartbeat(tmp_path)["stopped_at"]
        # the lock went with the process: a new one starts
        again = _start(config)
        try:
            assert wait_for(lambda: (_heartbeat(tmp_path) or {}).get("pid") == again.pid, 15)
        finally:
            _stop(again)


def test_sighup_reloads_the_configuration_and_refuses_a_bad_one(tmp_path):
    with FakeAmiServer() as old, FakeAmiServer() as new:
        config = _config(tmp_path, old)
        proc = _start(config)
        try:
            assert wait_for(lambda: old.logins == 1, 15)
            with open(config, "w") as f:
                f.write("[ami]\nhost = 127.0.0.1\nport = %d\nusername = bx24\nsecret = s3cret\n"
                        "reconnect_max_delay = 1\n[storage]\nstate_dir = %s\n" % (new.port, tmp_path))
            proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: new.logins == 1, 15)
            assert wait_for(lambda: (_heartbeat(tmp_path) or {}).get("ami", {}).get("port") == new.port, 15)
            with open(config, "w") as f:
                f.write("[ami]\nport = many\n")
            proc.send_signal(signal.SIGHUP)
            time.sleep(2.5)
            assert proc.poll() is None and new.logins == 1
        finally:
            _out, err = _stop(proc)
    assert "SIGHUP: configuration reloaded" in err
    assert "SIGHUP: the new configuration is refused, keeping the running one" in err and "[ami] port" in err
    assert proc.returncode == 0


def test_a_fresh_install_serves_the_wizard_before_ami_is_set(tmp_path):
    import http.client
    import socket
    import bx24ast
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    conf = tmp_path / "bx24ast.conf"
    conf.write_text(bx24ast.example_config_text())
    bx24ast.update_config_file(str(conf), {("storage", "state_dir"): str(tmp_path), ("wizard", "listen"):
                                           "127.0.0.1:%d" % port, ("routing", "agi_listen"): "",
                                           ("routing", "http_listen"): "", ("cel", "backend"): "off",
                                           ("wizard", "password_hash"): bx24ast.hash_password("long enough pw")})
    proc = _start(str(conf))
    try:
        assert wait_for(lambda: (_heartbeat(tmp_path) or {}).get("listeners"), 15), proc.poll()
        beat = _heartbeat(tmp_path)
        assert beat["listeners"][0]["name"].startswith("wizard")
        assert "not configured yet" in beat["ami"]["last_error"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/config/master/login")
        resp = conn.getresponse()
        assert resp.status == 200 and b"password" in resp.read()
        conn.close()
    finally:
        _out, err = _stop(proc)
    assert "only the setup wizard runs" in err


def test_service_mode_can_log_to_syslog():
    import logging
    import logging.handlers
    import bx24ast
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level   # pytest's own capture handlers
    try:
        bx24ast.setup_logging("warning", "syslog")
        assert len(root.handlers) == 1 and isinstance(root.handlers[0], logging.handlers.SysLogHandler)
        assert root.level == logging.WARNING
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)


# -- several PBXs in one daemon ------------------------------------------------------------------

def _parse_metrics(text):
    """{(name, frozenset(labels)): value} from the Prometheus text format, checking its shape."""
    import re
    out, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            typed.add(name)
            continue
        if line.startswith("# HELP ") or not line:
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (-?[0-9.e+]+|\+Inf)$', line)
        assert m, line
        name, labels, value = m.groups()
        pairs = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
        assert re.sub(r"_(bucket|sum|count)$", "", name) in typed, line
        out[(name, pairs)] = float(value)
    return out


def test_two_pbxs_share_one_outbox_and_the_portals_limit(tmp_path, caplog):
    """The same burst capture on two Asterisks at once: their linkedids are the same, their
    calls are not. One emulator at the cloud's 2 req/s, bucket 50."""
    import threading
    import urllib.request
    import bx24ast
    from b24_emulator import Bitrix24Emulator
    from test_discovery import ev
    burst = os.path.join(PJSIP, "concurrent_burst")
    branch_phones = {"PJSIPShowEndpoints": [ev("EndpointList", ObjectName="201", Auths="201-auth", OutboundAuths="",
                                               Contacts="", Aor="201")]}
    import logging
    caplog.set_level(logging.INFO, logger="bx24ast")
    expected = load_expected(burst)["calls"]
    with Bitrix24Emulator() as emu, FakeAmiServer([burst], speed=4.0) as office, \
            FakeAmiServer([burst], speed=4.0, seed=7, lists=branch_phones) as branch:
        emu.add_user(11, "Branch Manager", "201")
        text = ("[ami]\nhost = 127.0.0.1\nport = %d\nusername = bx24\nsecret = s3cret\n"
                "[ami:branch]\nhost = 127.0.0.1\nport = %d\nusername = bx24\nsecret = s3cret\n"
                "[pbx:branch]\ndiscovery_minutes = 1\n"
                "[bitrix24]\nwebhook_url = %s\n[cel]\nbackend = off\n[routing]\nagi_listen =\nhttp_listen =\n"
                "[click_to_call]\nmode = port\nlisten = 127.0.0.1:0\napplication_token = tok\n"
                "[metrics]\nlisten = 127.0.0.1:0\n[storage]\nstate_dir = %s\n[recordings]\npath = %s\n"
                "settle_seconds = 0\n[crm]\nmissed_task = no\n"
                "[lines]\n74951234567 = ADVERTISING\n74957654321 = PARTNER\n[lines:branch]\n74951234567 = WEB\n"
                % (office.port, branch.port, emu.webhook_url, tmp_path, os.path.join(burst, "recordings")))
        daemon = bx24ast.Daemon(bx24ast.Config.from_text(text))
        thread = threading.Thread(target=daemon.run)
        thread.start()
        try:
            assert [p.name for p in daemon.pbxs] == ["", "branch"]
            assert wait_for(lambda: len(emu.stats) == 2 * len(expected) and not daemon.bridge.outbox.counts().get(
                "pending"), 120), (len(emu.stats), daemon.bridge.outbox.counts())
            stats = dict((r["EXTERNAL_CALL_ID"], r) for r in emu.stats.values())
            for call in expected:
                mine, theirs = stats[call["linkedid"]], stats["branch:" + call["linkedid"]]
                assert mine["CALL_ID"] != theirs["CALL_ID"]
                for rec in (mine, theirs):
                    assert rec["CALL_FAILED_CODE"] == ("200" if call["disposition"] == "ANSWERED" else "304")
            # each PBX reads a DID in its own line map: the branch's 74951234567 is another line
            sources = dict((e["params"]["EXTERNAL_CALL_ID"], e["params"].get("CRM_SOURCE")) for e in emu.journal
                           if e["method"] == "telephony.externalcall.register")
            for call in expected:
                mine = {"74951234567": "ADVERTISING", "74957654321": "PARTNER"}[call["did"]]
                theirs = {"74951234567": "WEB", "74957654321": "PARTNER"}[call["did"]]
                assert (sources[call["linkedid"]], sources["branch:" + call["linkedid"]]) == (mine, theirs)
            finishes = [e for e in emu.journal if e["method"] == "telephony.externalcall.finish"]
            assert len(finishes) == len(set(e["params"]["CALL_ID"] for e in finishes)) == 2 * len(expected)
            assert emu.rejected_503 == 0 and emu.max_level <= emu.burst
            # click-to-call rings the employee's phone on the PBX that has it
            assert wait_for(lambda: daemon.pbxs[1].has_phone("201"), 10)
            assert daemon.click.start({"CALL_ID": "externalCall.b.1", "USER_ID": "11", "PHONE_NUMBER": "89160000051"},
                                      "test")[0]
            assert daemon.click.start({"CALL_ID": "externalCall.o.1", "USER_ID": "5", "PHONE_NUMBER": "89160000052"},
                                      "test")[0]
            def originated(ami):
                return [a["Channel"] for a in ami.actions if a.get("Action") == "Originate"]
            assert wait_for(lambda: originated(branch) and originated(office), 10)
            assert originated(branch) == ["Local/201@from-internal"] and originated(office) == ["Local/101@from-internal"]
            # the status and /metrics tell the PBXs apart
            status = daemon.status()
            assert [(p["name"], p["connected"]) for p in status["pbxs"]] == [("", True), ("branch", True)]
            port = [s.address[1] for label, s in daemon.listeners if label.startswith("metrics")][0]
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as reply:
                assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                metrics = _parse_metrics(reply.read().decode())
            answered = sum(1 for c in expected if c["disposition"] == "ANSWERED")
            for pbx in ("", "branch"):
                calls = dict((dict(k[1])["outcome"], v) for k, v in metrics.items()
                             if k[0] == "bx24ast_calls_total" and dict(k[1])["pbx"] == pbx)
                assert calls == dict(answered=answered, missed=len(expected) - answered) if answered < len(expected) \
                    else calls == {"answered": answered}
                assert metrics[("bx24ast_ami_connected", frozenset([("pbx", pbx)]))] == 1
            assert metrics[("bx24ast_card_latency_seconds_count", frozenset())] >= 2 * len(expected)
            assert metrics[("bx24ast_outbox_requests", frozenset([("state", "pending")]))] == 0
            rest = dict((dict(k[1])["method"], v) for k, v in metrics.items()
                        if k[0] == "bx24ast_rest_requests_total" and dict(k[1])["code"] == "200")
            assert rest["telephony.externalcall.finish"] == 2 * len(expected)
            # log lines say which PBX a call is on
            lines = [r.getMessage() for r in caplog.records]
            first = expected[0]["linkedid"]
            assert any(line.startswith("call branch:%s ended " % first) for line in lines)
            assert any(line.startswith("call %s ended " % first) for line in lines)
        finally:
            daemon.stop()
            thread.join(20)
            daemon.bridge.store.close()


def test_a_fastagi_session_from_a_branchs_address_is_that_pbxs_call(tmp_path):
    import bx24ast
    config = bx24ast.Config.from_text(
        "[ami:branch]\nhost = 10.0.2.5\n[ami:old]\nhost = 10.0.2.6\n[ami:twin]\nhost = 10.0.2.6\n"
        "[ami:local]\nhost = 127.0.0.1\n[ami:named]\nhost = pbx.example\n[cel]\nbackend = off\n")
    daemon = bx24ast.Daemon(config)
    # two Asterisks on one host, or one beside [ami]'s (127.0.0.1), are told apart only by
    # agi://...?pbx=NAME; a host name is not resolved behind the admin's back
    assert daemon._pbx_by_address() == {"10.0.2.5": "branch"}


def test_sighup_loads_the_hooks_file_again(tmp_path):
    from b24_emulator import Bitrix24Emulator
    hooks = tmp_path / "hooks.py"
    hooks.write_text("def need_registration(call):\n    return True\n")
    with FakeAmiServer() as server, Bitrix24Emulator() as emu:
        config = _config(tmp_path, server)
        with open(config, "a") as f:
            f.write("[bitrix24]\nwebhook_url = %s\n[hooks]\nfile = %s\n[cel]\nbackend = off\n"
                    "[routing]\nagi_listen =\nhttp_listen =\n" % (emu.webhook_url, hooks))
        proc = _start(config)
        try:
            assert wait_for(lambda: ((_heartbeat(tmp_path) or {}).get("hooks") or {}).get("loaded")
                            == ["need_registration"], 20)
            hooks.write_text("def process_final_params(params, call):\n    return params\n"
                             "def post_finish(result, call):\n    return []\n")
            proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: ((_heartbeat(tmp_path) or {}).get("hooks") or {}).get("loaded")
                            == ["post_finish", "process_final_params"], 20)
            hooks.write_text("def process_final_params(params, call):\n    return (\n")
            proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: ((_heartbeat(tmp_path) or {}).get("hooks") or {}).get("load_error"), 20)
            assert proc.poll() is None
        finally:
            _out, err = _stop(proc)
    assert err.count("hooks: %s loaded" % hooks) == 2
    assert "cannot be loaded, running without hooks: SyntaxError" in err
