"""bx24ast as a real process against a real Asterisk (22.10.1 and 16.30.1) and the
Bitrix24 emulator: everyday calls driven through the office dialplan of tests/live/,
click-to-call through a real OnExternalCallStart POST, FastAGI called by a real
AGI(agi://...), ExtensionState of a real hint, the wizard's AMI user with a real
`manager reload`, Asterisk's `core restart now` and a daemon restart mid-call.

Needs the prebuilt bundles (../shared/asterisk/ or BX24AST_ASTERISK_BUNDLES) and their
runtime packages; without them these tests skip with the reason (in CI they fail).
"""
import http.client
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import bx24ast
import live_scenarios
from b24_emulator import Bitrix24Emulator
from conftest import ROOT, wait_for
from live_asterisk import VERSIONS, LiveAsterisk, free_port, missing_reason

SCRIPT = os.path.join(ROOT, "bx24ast.py")
USERS = {"101": 5, "102": 7, "103": 9}
TOKEN = "live-t0ken"
STATUS = {"ANSWERED": "200", "NO ANSWER": "304", "BUSY": "486", "FAILED": "603"}


def _need(version):
    reason = missing_reason(version)
    if reason:
        if os.environ.get("CI"):
            pytest.fail("live Asterisk %s cannot run in CI: %s" % (version, reason))
        pytest.skip("live Asterisk %s: %s" % (version, reason))


class Daemon(object):
    """`bx24ast.py run` as its own process, with a config for this Asterisk and portal."""

    def __init__(self, tmp, pbx, emu, phone_channel="Local/{extension}@from-internal"):
        self.tmp = tmp
        self.agi_port = free_port()
        self.click_port = free_port()
        self.log = os.path.join(tmp, "bx24ast.log")
        self.conf = os.path.join(tmp, "bx24ast.conf")
        with open(self.conf, "w") as f:
            f.write("""[ami]
host = 127.0.0.1
port = %(ami)d
username = test
secret = test
auth = md5
ping_interval = 2
reconnect_max_delay = 1
[bitrix24]
webhook_url = %(webhook)s
rate = %(rate)s
burst = %(burst)s
timeout = 5
[crm]
default_user_id = 1
callback_window_minutes = 0
[recordings]
path = %(monitor)s
settle_seconds = 0.5
[cel]
backend = sqlite
sqlite_path = %(cel)s
recover_interval_minutes = 0.1
[routing]
agi_listen = 127.0.0.1:%(agi)d
http_listen =
budget_ms = 2000
hint_context = from-internal
[click_to_call]
mode = port
listen = 127.0.0.1:%(click)d
application_token = %(token)s
phone_channel = %(phone)s
outbound_context = from-internal
user_interval_seconds = 0
callback_extension = 600
[storage]
state_dir = %(tmp)s
[log]
file = %(log)s
level = debug
""" % dict(ami=pbx.port, webhook=emu.webhook_url, rate=emu.rate, burst=emu.burst,
                monitor=pbx.monitor_dir(), cel=pbx.cel_db(), agi=self.agi_port, click=self.click_port,
                token=TOKEN, tmp=tmp, log=self.log, phone=phone_channel))
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, SCRIPT, "-c", self.conf, "run"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: "AMI: logged in" in self.read_log(), 20), self.read_log()[-3000:]
        # the listeners start beside the AMI login, not before it: wait until they answer
        assert wait_for(lambda: self._listening(self.click_port) and self._listening(self.agi_port), 20), \
            self.read_log()[-3000:]
        return self

    @staticmethod
    def _listening(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def read_log(self):
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except IOError:
            return ""

    def stop(self, sig=signal.SIGTERM):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def post_click(self, body):
        conn = http.client.HTTPConnection("127.0.0.1", self.click_port, timeout=10)
        conn.request("POST", "/bitrix24", body, {"Content-Type": "application/x-www-form-urlencoded"})
        reply = conn.getresponse()
        out = reply.status, reply.read()
        conn.close()
        return out


@pytest.fixture(scope="module", params=VERSIONS)
def office(request, tmp_path_factory):
    """A live Asterisk, the emulator and bx24ast running against both; torn down always."""
    version = request.param
    _need(version)
    tmp = str(tmp_path_factory.mktemp("live-%s" % version))
    pbx = LiveAsterisk(version)
    emu = Bitrix24Emulator()
    daemon = None
    try:
        pbx.start()
        emu.start()
        daemon = Daemon(tmp, pbx, emu)
        pbx.cli("dialplan set global BX24_AGI 127.0.0.1:%d" % daemon.agi_port)
        daemon.start()
        yield pbx, emu, daemon
    finally:
        if daemon is not None:
            daemon.stop()
        emu.stop()
        pbx.stop()


def _stat(emu, linkedid):
    for rec in list(emu.stats.values()):
        if rec.get("EXTERNAL_CALL_ID") == linkedid:
            return rec
    return None


def _registers(emu, linkedid):
    return [e for e in list(emu.journal) if e["method"] == "telephony.externalcall.register"
            and e.get("status") == 200 and e["params"].get("EXTERNAL_CALL_ID") == linkedid]


def _check_call(emu, want):
    """The portal's final state of one call against its ground truth."""
    linkedid = want["linkedid"]
    assert wait_for(lambda: _stat(emu, linkedid) is not None, 40), \
        "call %s never finished in Bitrix24" % linkedid
    rec = _stat(emu, linkedid)
    assert len(_registers(emu, linkedid)) == 1, "registered %d times" % len(_registers(emu, linkedid))
    assert rec["CALL_FAILED_CODE"] == STATUS[want["disposition"]], (linkedid, rec)
    if want["disposition"] == "ANSWERED":
        assert abs(rec["CALL_DURATION"] - want["first_bridge_to_hangup_s"]) <= 1, rec
        talker = want["final_extension"] if want["direction"] == "inbound" else want["extension"]
        assert rec["PORTAL_USER_ID"] == USERS[talker]
    else:
        assert rec["CALL_DURATION"] == 0
    assert rec["INCOMING"] == ("2" if want["direction"] == "inbound" else "1")
    number = want["external_number"]
    if number is None:
        assert rec["PHONE_NUMBER"] == "0000000000"
    else:
        assert rec["PHONE_NUMBER"] == bx24ast.NumberPlan().normalize(number)
    return rec


@pytest.mark.parametrize("name", [s.name for s in live_scenarios.ALL])
def test_everyday_call_reaches_bitrix24(office, name):
    pbx, emu, daemon = office
    tasks_before = len(emu.tasks)
    truth = live_scenarios.BY_NAME[name].run(pbx)
    assert pbx.wait_idle(60), pbx.channels()
    missed = 0
    for want in truth:
        rec = _check_call(emu, want)
        if want["disposition"] == "ANSWERED":
            # the recording MixMonitor wrote, attached once
            assert wait_for(lambda: rec["CALL_ID"] in emu.records, 20), "no recording attached"
        if want["direction"] == "inbound" and want["disposition"] != "ANSWERED":
            missed += 1
    # one missed-call task per missed inbound call, none for the others
    assert wait_for(lambda: len(emu.tasks) >= tasks_before + missed, 20)
    time.sleep(0.2)   # a task that should not exist would have come with the finish
    new = list(emu.tasks.values())[tasks_before:]
    assert len(new) == missed, [t["title"] for t in new]
    for want, task in zip([w for w in truth if w["direction"] == "inbound"], new):
        assert ("withheld number" if want["external_number"] is None else want["external_number"][-7:]) \
            in task["title"]


def test_click_to_call_through_the_port_mode_listener(office):
    """A real OnExternalCallStart POST: one Originate through Local/101@from-internal, the
    call finished under Bitrix24's CALL_ID, talk time from the client's answer."""
    pbx, emu, daemon = office
    pbx.db("simphone", "101", "2/0")
    pbx.db("simremote", "89161234567", "3/5")
    data = emu.start_click(5, "+7 (916) 123-45-67")
    assert daemon.post_click(emu.event_form("ONEXTERNALCALLSTART", data, "wrong"))[0] == 403
    status, answer = daemon.post_click(emu.event_form("ONEXTERNALCALLSTART", data, TOKEN))
    assert status == 200 and b"originated" in answer, answer
    call_id = data["CALL_ID"]
    assert wait_for(lambda: call_id in emu.stats, 40), daemon.read_log()[-2000:]
    stat = emu.stats[call_id]
    assert stat["CALL_FAILED_CODE"] == "200" and stat["PORTAL_USER_ID"] == 5
    assert abs(stat["CALL_DURATION"] - 5) <= 1
    assert wait_for(lambda: call_id in emu.records, 20)
    # a repeated POST never dials twice
    assert b"already handled" in daemon.post_click(emu.event_form("ONEXTERNALCALLSTART", data, TOKEN))[1]
    assert pbx.wait_idle(30)


def test_fastagi_routes_a_known_caller_to_the_crm_owner(office):
    """74950000004 runs AGI(agi://.../responsible); the contact belongs to user 9 (103)."""
    pbx, emu, daemon = office
    emu.add_contact("+79167770001", assigned=9)
    for ext in ("101", "102"):
        pbx.db("simphone", ext, "never")
    pbx.db("simphone", "103", "1/0")
    uid = live_scenarios.Scenario.inbound(pbx, "74950000004", "+79167770001", "talk3")
    want = live_scenarios.call(uid, "inbound", "+79167770001", "74950000004", ["103"], "103", "103", talk=3)
    assert pbx.wait_idle(40)
    rec = _check_call(emu, want)
    assert rec["PORTAL_USER_ID"] == 9
    # the ring group was never rung: the owner's phone alone
    assert not [e for e in emu.journal if e["method"] == "telephony.externalcall.show"
                and e["params"].get("CALL_ID") == rec["CALL_ID"]]


def test_extension_state_of_a_real_hint(office):
    """What routing asks before choosing a phone: a real hint answers, a missing one too."""
    pbx, emu, daemon = office
    conn = bx24ast.AmiConnection("127.0.0.1", pbx.port, "test", "test", lambda m: None, auth="md5",
                                 wanted_events=frozenset())
    conn.start()
    try:
        assert conn.connected.wait(10)
        state = conn.action("ExtensionState", [("Exten", "101"), ("Context", "from-internal")]).response
        assert state.get("Status") in ("0", "1", "2", "8", "16"), dict(state)
        assert state.get("Hint") == "Local/101@phones", dict(state)
        try:
            missing = conn.action("ExtensionState", [("Exten", "199"), ("Context", "from-internal")]).response
            assert missing.get("Status") == "-1", dict(missing)
        except bx24ast.AmiActionFailed:
            pass  # some versions refuse an extension without a hint outright
    finally:
        conn.stop()


def test_asterisk_core_restart_mid_call_loses_nothing(office):
    pbx, emu, daemon = office
    pbx.db("simphone", "101", "1/0")
    pbx.db("simphone", "102", "never")
    uid = live_scenarios.Scenario.inbound(pbx, live_scenarios.DID1, "+79161230002", "stay")
    assert wait_for(lambda: _registers(emu, uid), 15)
    time.sleep(2)
    pbx.reset_driver()
    pbx.cli("core restart now")
    # Asterisk comes back by itself; the daemon reconnects and closes the call
    assert wait_for(lambda: _stat(emu, uid) is not None, 60), daemon.read_log()[-3000:]
    assert len(_registers(emu, uid)) == 1
    assert wait_for(lambda: "logged in" in daemon.read_log().rsplit("Shutdown", 1)[-1] or
                    daemon.read_log().count("AMI: logged in") >= 2, 40)
    assert wait_for(lambda: _ami_alive(pbx) and "fully booted" in pbx.cli("core waitfullybooted"), 60)
    pbx.cli("dialplan set global BX24_AGI 127.0.0.1:%d" % daemon.agi_port)


def _ami_alive(pbx):
    try:
        socket.create_connection(("127.0.0.1", pbx.port), timeout=2).close()
        return True
    except OSError:
        return False


def test_daemon_restart_while_calls_are_up(office):
    pbx, emu, daemon = office
    assert wait_for(lambda: _ami_alive(pbx), 30)
    pbx.db("simphone", "101", "1/0")
    pbx.db("simphone", "102", "never")
    uid = live_scenarios.Scenario.inbound(pbx, live_scenarios.DID1, "+79161230003", "talk8")
    assert wait_for(lambda: _registers(emu, uid), 15)
    daemon.stop()
    time.sleep(1)
    daemon.start()
    assert pbx.wait_idle(40)
    assert wait_for(lambda: _stat(emu, uid) is not None, 40), daemon.read_log()[-3000:]
    rec = _stat(emu, uid)
    assert len(_registers(emu, uid)) == 1
    assert rec["CALL_FAILED_CODE"] == "200" and rec["PORTAL_USER_ID"] == 5


def test_detect_lists_the_trunks_and_phones_asterisk_has(office):
    """PBX discovery against the real endpoint lists (tests/live/*_custom.conf)."""
    pbx, emu, daemon = office
    out = subprocess.run([sys.executable, SCRIPT, "-c", daemon.conf, "detect"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True, timeout=60).stdout
    tech = "PJSIP" if pbx.major >= 20 else "SIP"
    rows = dict((line.split()[1], line.split()[0]) for line in out.splitlines()
                if line.startswith("  ") and "/" in line)
    assert rows.get("%s/trunk-operator" % tech) == "trunk", out
    assert rows.get("%s/7001" % tech) == "trunk", out      # extension-shaped, but it registers out
    assert rows.get("%s/101" % tech) == "phone", out
    # the daemon learned the same and says so in its heartbeat
    beat = bx24ast.Heartbeat(daemon.tmp)
    assert wait_for(lambda: any(e["device"] == "%s/7001" % tech and e["kind"] == "trunk"
                                for e in (beat.read() or {}).get("endpoints", [])), 30)


def test_a_call_made_while_the_daemon_is_down_comes_back_from_cel(office):
    """Stopped daemon, a whole call, started again: CEL gives it back once, with the talker,
    the talk time and the recording MixMonitor wrote."""
    pbx, emu, daemon = office
    assert wait_for(lambda: _ami_alive(pbx), 30)
    daemon.stop()
    try:
        truth = live_scenarios.BY_NAME["inbound_answered"].run(pbx)
        assert pbx.wait_idle(40)
        time.sleep(1.5)  # LINKEDID_END is written after the last hang-up
    finally:
        daemon.start()
    want = truth[0]
    rec = _check_call(emu, want)
    register = _registers(emu, want["linkedid"])[0]
    assert str(register["params"].get("SHOW")) == "0", "a late call must not pop a card up"
    assert wait_for(lambda: rec["CALL_ID"] in emu.records, 30), "the recording was not attached"
    assert emu.records[rec["CALL_ID"]]["FILENAME"].endswith(".wav")


def test_wizard_creates_the_ami_user_and_asterisk_takes_it(office, tmp_path):
    """'Create the user bx24' on the instance's manager.conf, a real 'manager reload', then
    a login with the new user that can run what bx24ast needs."""
    pbx, emu, daemon = office
    assert wait_for(lambda: _ami_alive(pbx), 30)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink(pbx.etc, str(root / "etc" / "asterisk"))
    wizard = bx24ast.SetupWizard(str(tmp_path / "bx24ast.conf"), root=str(root),
                                 asterisk_command=[pbx.script, "cli", pbx.dir])
    draft = {}
    message, ok = wizard.create_ami_user(draft)
    assert ok, message
    assert draft[("ami", "username")] == "bx24" and len(draft[("ami", "secret")]) >= 20
    events = []
    conn = bx24ast.AmiConnection("127.0.0.1", pbx.port, "bx24", draft[("ami", "secret")], events.append,
                                 auth="md5")
    conn.start()
    try:
        assert conn.connected.wait(10), conn.last_error
        assert conn.ping().response.success
        state = conn.action("ExtensionState", [("Exten", "102"), ("Context", "from-internal")]).response
        assert state.get("Hint") == "Local/102@phones"
        assert conn.action("CoreShowChannels").response.success
        # and its read rights carry the call events bx24ast tracks
        pbx.db("simphone", "101", "1/2")
        live_scenarios.Scenario.phone_dials(pbx, "103", "101", stay=3)
        assert wait_for(lambda: any(e.name == "Newchannel" for e in events), 15)
        assert pbx.wait_idle(30)
    finally:
        conn.stop()
    # a second time replaces our own section instead of adding another
    message, ok = wizard.create_ami_user({})
    with open(os.path.join(pbx.etc, "manager.conf")) as f:
        assert f.read().count("[bx24]") == 1


def test_callback_form_rings_the_group_then_the_client(office):
    """OnExternalCallBackStart: ring group 600 first (101 answers), then the client; the
    call is registered as a callback (TYPE 4) and finished with 101."""
    pbx, emu, daemon = office
    pbx.db("simphone", "101", "1/0")
    pbx.db("simphone", "102", "never")
    pbx.db("simremote", "89165554433", "2/4")
    data = {"PHONE_NUMBER": "+7 916 555-44-33", "TEXT": "Call back", "VOICE": "ruinternalfemale",
            "CRM_ENTITY_TYPE": "LEAD", "CRM_ENTITY_ID": "12", "LINE_NUMBER": ""}
    status, answer = daemon.post_click(emu.event_form("ONEXTERNALCALLBACKSTART", data, TOKEN))
    assert status == 200, answer
    assert wait_for(lambda: pbx.channels(), 10)
    assert pbx.wait_idle(40)

    def registered():
        return [e for e in list(emu.journal) if e["method"] == "telephony.externalcall.register"
                and e.get("status") == 200 and str(e["params"].get("TYPE")) == "4"]
    assert wait_for(registered, 20), daemon.read_log()[-2000:]
    reg = registered()[0]
    assert reg["params"]["PHONE_NUMBER"] == "+79165554433"
    linkedid = reg["params"]["EXTERNAL_CALL_ID"]
    assert wait_for(lambda: _stat(emu, linkedid) is not None, 30)
    stat = _stat(emu, linkedid)
    assert stat["CALL_FAILED_CODE"] == "200" and stat["PORTAL_USER_ID"] == 5
    assert abs(stat["CALL_DURATION"] - 4) <= 1


def test_click_to_call_through_the_sip_endpoint_itself(office, tmp_path):
    """phone_channel = PJSIP/{extension} (22) or SIP/{extension} (16): the Originate goes to
    the real endpoint; nothing is registered behind 101 here, so Asterisk refuses it and
    the card Bitrix24 opened is closed, once, with the employee."""
    pbx, emu, daemon = office
    tech = "PJSIP" if pbx.major >= 20 else "SIP"
    daemon.stop()
    direct = Daemon(str(tmp_path), pbx, emu, phone_channel=tech + "/{extension}")
    try:
        direct.start()
        data = emu.start_click(5, "+7 916 123-45-67")
        status, answer = direct.post_click(emu.event_form("ONEXTERNALCALLSTART", data, TOKEN))
        assert status == 200 and b"originated" in answer, answer
        call_id = data["CALL_ID"]
        assert wait_for(lambda: call_id in emu.stats, 40), "\n".join(
            line for line in direct.read_log().splitlines() if "click" in line or call_id in line
            or "Originate" in line or "WARNING" in line or "ERROR" in line)[-4000:]
        stat = emu.stats[call_id]
        assert stat["PORTAL_USER_ID"] == 5 and stat["CALL_FAILED_CODE"] != "200" and stat["CALL_DURATION"] == 0
    finally:
        direct.stop()
        daemon.start()
