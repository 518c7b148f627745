"""Routing and click-to-call: FastAGI and HTTP lookups, port mode, offline events."""
import http.client
import json
import os
import socket
import threading
import time

import pytest

import bx24ast
from b24_emulator import Bitrix24Emulator
from conftest import FIXTURES, load_expected, wait_for
from fake_ami import FakeAmiServer

PJSIP = os.path.join(FIXTURES, "asterisk-22.10.1-pjsip")
CLICK = os.path.join(PJSIP, "click2call_originate")


# -- helpers -------------------------------------------------------------------------------------

def agi_env(number="89161234567", script="responsible", args=()):
    lines = ["agi_network: yes", "agi_network_script: %s" % script,
             "agi_request: agi://127.0.0.1/%s" % script, "agi_channel: PJSIP/trunk-operator-00000001",
             "agi_language: en", "agi_type: PJSIP", "agi_uniqueid: 1795667000.1", "agi_version: 22.10.1",
             "agi_callerid: %s" % number, "agi_calleridname: unknown", "agi_callingpres: 0",
             "agi_dnid: 74951234567", "agi_context: from-trunk", "agi_extension: s", "agi_priority: 3",
             "agi_enhanced: 0.0", "agi_accountcode: ", "agi_threadid: 140000000000"]
    lines += ["agi_arg_%d: %s" % (i + 1, a) for i, a in enumerate(args)]
    return ("\n".join(lines) + "\n\n").encode()


def agi_session(port, env, answer=lambda n, cmd: "200 result=1", timeout=10):
    """Speak AGI as Asterisk does; returns the commands the server sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    commands = []
    try:
        sock.sendall(env)
        f = sock.makefile("rb")
        while True:
            line = f.readline()
            if not line:
                break
            cmd = line.decode().rstrip("\n")
            commands.append(cmd)
            reply = answer(len(commands), cmd)
            if reply is None:
                break
            sock.sendall((reply + "\n").encode())
    finally:
        sock.close()
    return commands


def variables(commands):
    out = {}
    for cmd in commands:
        assert cmd.startswith("SET VARIABLE "), cmd
        name, _, value = cmd[len("SET VARIABLE "):].partition(" ")
        assert value.startswith('"') and value.endswith('"'), cmd
        out[name] = value[1:-1]
    return out


class Routing(object):
    """ResponsibleLookup + FastAGI + HTTP lookup against the emulator (and a fake AMI)."""

    def __init__(self, emu, ami_server=None, budget=0.5, set_callerid_name=False, cache_seconds=600, **lookup):
        self.emu = emu
        self.rules = bx24ast.PbxRules.defaults()
        self.client = bx24ast.BitrixClient(webhook_url=emu.webhook_url, timeout=10, rate=emu.rate,
                                           burst=emu.burst)
        self.users = bx24ast.UserDirectory(self.client)
        self.users.refresh()
        self.ami = None
        if ami_server is not None:
            self.ami = bx24ast.AmiConnection("127.0.0.1", ami_server.port, "bx24", "s3cret", lambda m: None)
            self.ami.start()
            assert self.ami.connected.wait(5)
        pbx_by_address = lookup.pop("pbx_by_address", None)
        self.lookup = bx24ast.ResponsibleLookup(self.client, self.users, self.rules, self.ami, budget=budget,
                                                cache_seconds=cache_seconds, **lookup)
        self.agi = bx24ast.FastAgiServer(self.lookup, "127.0.0.1", 0, set_callerid_name, pbx_by_address)
        self.http = bx24ast.LookupHttpServer(self.lookup, "127.0.0.1", 0)

    def __enter__(self):
        self.agi.start()
        self.http.start()
        return self

    def __exit__(self, *exc):
        self.agi.stop()
        self.http.stop()
        if self.ami is not None:
            self.ami.stop()

    def ask(self, number, **kw):
        return variables(agi_session(self.agi.address[1], agi_env(number), **kw))

    def get(self, path):
        conn = http.client.HTTPConnection("127.0.0.1", self.http.address[1], timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = json.loads(resp.read().decode())
        conn.close()
        return resp.status, body


def searches(emu):
    return [e for e in emu.journal if e["method"] == "telephony.externalcall.searchcrmentities"]


# -- responsible routing ----------------------------------------------------------------------------

def test_agi_sets_the_responsible_of_a_known_caller_and_caches_it():
    with Bitrix24Emulator() as emu:
        contact = emu.add_contact("+79161234567", "Known Client", assigned=7)
        with Routing(emu) as r:
            found = r.ask("89161234567")
            assert found == {"BX24_RESPONSIBLE_EXT": "102", "BX24_RESPONSIBLE_USER": "7",
                             "BX24_CRM_ENTITY": "CONTACT_%d" % contact, "BX24_RESPONSIBLE_STATUS": "FOUND"}
            assert len(searches(emu)) == 1
            assert searches(emu)[0]["params"]["PHONE_NUMBER"] == "+79161234567"
            # the same client, written another way: answered from the cache
            assert r.ask("+7 916 123-45-67") == found
            assert len(searches(emu)) == 1 and r.lookup.cache_hits == 1
            # the caller's number may also come as the AGI argument
            args = variables(agi_session(r.agi.address[1], agi_env("anonymous", args=["79161234567"])))
            assert args["BX24_RESPONSIBLE_EXT"] == "102"


def test_agi_leaves_the_variables_empty_for_an_unknown_or_missing_caller():
    with Bitrix24Emulator() as emu:
        with Routing(emu) as r:
            assert r.ask("84950000000") == {"BX24_RESPONSIBLE_EXT": "", "BX24_RESPONSIBLE_USER": "",
                                            "BX24_CRM_ENTITY": "", "BX24_RESPONSIBLE_STATUS": "NOT_FOUND"}
            assert r.ask("anonymous")["BX24_RESPONSIBLE_STATUS"] == "INVALID"
            assert len(searches(emu)) == 1  # no lookup for a number that is not one


def test_responsible_without_extension_is_reported_but_not_dialled():
    with Bitrix24Emulator() as emu:
        emu.add_user(11, "No Phone")
        emu.add_contact("+79161110000", "Quiet Client", assigned=11)
        with Routing(emu) as r:
            found = r.ask("89161110000")
            assert found["BX24_RESPONSIBLE_EXT"] == "" and found["BX24_RESPONSIBLE_USER"] == "11"
            assert found["BX24_RESPONSIBLE_STATUS"] == "NO_EXTENSION"


def test_a_slow_portal_never_holds_the_caller_past_the_budget():
    with Bitrix24Emulator() as emu:
        emu.add_contact("+79161234567", "Known Client", assigned=7)
        with Routing(emu, budget=0.5) as r:
            emu.delay = 5.0
            started = time.time()
            found = r.ask("89161234567")
            waited = time.time() - started
            assert found["BX24_RESPONSIBLE_EXT"] == "" and found["BX24_RESPONSIBLE_STATUS"] == "TIMEOUT"
            assert waited < 3.0, waited  # 0.5 s budget; the portal takes 5 s
            # the lookup went on in the background: the next call from the client is routed
            assert wait_for(lambda: r.lookup._cache, 10)
            emu.delay = 0
            assert r.ask("89161234567")["BX24_RESPONSIBLE_EXT"] == "102"


def test_an_unavailable_phone_is_not_chosen():
    with Bitrix24Emulator() as emu, FakeAmiServer(extension_states={"102": "4", "101": "0"}) as ami:
        emu.add_contact("+79161234567", "Known Client", assigned=7)
        emu.add_contact("+79162222222", "Other Client", assigned=5)
        with Routing(emu, ami) as r:
            found = r.ask("89161234567")
            assert found["BX24_RESPONSIBLE_EXT"] == "" and found["BX24_RESPONSIBLE_USER"] == "7"
            assert found["BX24_RESPONSIBLE_STATUS"] == "UNAVAILABLE"
            assert r.ask("89162222222")["BX24_RESPONSIBLE_EXT"] == "101"
            asked = [a for a in ami.actions if a.get("Action") == "ExtensionState"]
            assert [(a["Exten"], a["Context"]) for a in asked] == [("102", "from-internal"), ("101", "from-internal")]


def _talked(records, lid, number, ext, ended_at):
    records.update(lid, external_number=number, answered=1, talker=ext, ended_at=ended_at, source="live")


def _office_lines(rules):
    config = bx24ast.Config.from_text(
        "[routing]\nhours = mon-sun 00:00-24:00\n"
        "[line:74951234567]\nresponsible = 7\nhours = mon-fri 09:00-18:00; sat 10:00-15:00\n"
        "[line:74957654321]\nresponsible = 5\n")
    return bx24ast.Lines.from_config(config, rules)


def test_sticky_routing_line_default_and_working_hours_over_fastagi(tmp_path):
    friday_noon = time.mktime((2026, 12, 4, 12, 0, 0, 0, 0, -1))
    saturday_night = time.mktime((2026, 12, 5, 22, 0, 0, 0, 0, -1))
    clock = [friday_noon]
    store = bx24ast.StateStore(str(tmp_path / "state.db"))
    records = bx24ast.CallRecords(store)
    _talked(records, "1.1", "+79160000031", "103", friday_noon - 2 * 86400)       # Oleg, two days ago
    _talked(records, "1.2", "+79160000031", "101", friday_noon - 20 * 86400)      # Ivan, long ago
    _talked(records, "1.3", "+79160000032", "101", friday_noon - 20 * 86400)      # only long ago
    with Bitrix24Emulator() as emu, FakeAmiServer(extension_states={"103": "0", "102": "0", "101": "4"}) as ami:
        emu.add_contact("+79160000033", "Owned Client", assigned=5)
        rules = bx24ast.PbxRules.defaults()
        with Routing(emu, ami, records=records, sticky_days=7, lines=_office_lines(rules),
                     wall=lambda: clock[0]) as r:
            def ask(number, line):
                return variables(agi_session(r.agi.address[1], agi_env(number, args=[number, line])))

            # no owner in the CRM: the last one who talked with the caller this week
            found = ask("89160000031", "74951234567")
            assert (found["BX24_RESPONSIBLE_EXT"], found["BX24_RESPONSIBLE_STATUS"]) == ("103", "STICKY")
            assert found["BX24_RESPONSIBLE_USER"] == "9"
            # too long ago: the line's responsible (user 7 = 102)
            found = ask("89160000032", "74951234567")
            assert (found["BX24_RESPONSIBLE_EXT"], found["BX24_RESPONSIBLE_STATUS"]) == ("102", "LINE")
            # the CRM's owner comes first, but his phone (101) is unavailable: the line's responsible
            # takes the call; on the second line the responsible is that same 101, and nobody is left
            found = ask("89160000033", "74951234567")
            assert (found["BX24_RESPONSIBLE_EXT"], found["BX24_RESPONSIBLE_STATUS"]) == ("102", "LINE")
            found = ask("89160000033", "74957654321")
            assert (found["BX24_RESPONSIBLE_EXT"], found["BX24_RESPONSIBLE_STATUS"]) == ("", "UNAVAILABLE")
            # the line written another way by the trunk is the same line
            assert ask("89160000032", "+7 (495) 123-45-67")["BX24_RESPONSIBLE_STATUS"] == "LINE"
            # Saturday night the first line is closed; the second follows [routing] hours (always)
            clock[0] = saturday_night
            found = ask("89160000031", "74951234567")
            assert (found["BX24_RESPONSIBLE_EXT"], found["BX24_RESPONSIBLE_STATUS"]) == ("", "CLOSED")
            assert ask("89160000031", "74957654321")["BX24_RESPONSIBLE_STATUS"] == "STICKY"
            # the line from the dialplan's extension when no argument names it
            env = agi_env("89160000031").replace(b"agi_extension: s", b"agi_extension: 74951234567")
            assert variables(agi_session(r.agi.address[1], env))["BX24_RESPONSIBLE_STATUS"] == "CLOSED"
            # and over HTTP
            status, body = r.get("/responsible?number=89160000032&line=74951234567")
            assert status == 200 and body["status"] == "CLOSED"
    store.close()


def test_each_pbx_routes_by_its_own_lines(tmp_path):
    """[line:branch:DID]: a call on the branch's Asterisk (agi://...?pbx=branch, or a
    session from the branch's AMI address) reads the line in the branch's map."""
    config = bx24ast.Config.from_text(
        "[ami:branch]\nhost = 10.0.2.5\n[line:74951234567]\nresponsible = 7\n"
        "[line:branch:74951234567]\nresponsible = 5\n")
    rules = bx24ast.PbxRules.defaults()
    lines = dict(lines=bx24ast.Lines.from_config(config, rules),
                 pbx_lines={"branch": bx24ast.Lines.from_config(config, rules, "branch")})
    with Bitrix24Emulator() as emu, FakeAmiServer(extension_states={"101": "0", "102": "0"}) as ami:
        with Routing(emu, ami, **lines) as r:
            def ask(script, address=None):
                r.agi.pbx_by_address = {"127.0.0.1": address} if address else {}
                env = agi_env("89160000032", script=script, args=["89160000032", "74951234567"])
                found = variables(agi_session(r.agi.address[1], env))
                return found["BX24_RESPONSIBLE_EXT"], found["BX24_RESPONSIBLE_STATUS"]

            assert ask("responsible") == ("102", "LINE")                     # user 7: the office's line
            assert ask("responsible?pbx=branch") == ("101", "LINE")          # user 5: the branch's
            assert ask("responsible", address="branch") == ("101", "LINE")
            assert ask("responsible?pbx=nowhere") == ("102", "LINE")         # logged, the office's lines
            status, body = r.get("/responsible?number=89160000032&line=74951234567&pbx=branch")
            assert status == 200 and (body["extension"], body["status"]) == ("101", "LINE")
            status, body = r.get("/responsible?number=89160000032&line=74951234567&pbx=nowhere")
            assert status == 400 and "pbx" in body["error"] and "nowhere" in body["error"]


@pytest.mark.parametrize("text, open_at, closed_at", [
    ("mon-fri 09:00-18:00", (2026, 12, 4, 17, 59), (2026, 12, 4, 18, 0)),
    ("пн-пт 09:00-13:00, 14:00-18:00", (2026, 12, 7, 14, 0), (2026, 12, 7, 13, 30)),
    ("fri-mon 22:00-06:00", (2026, 12, 7, 5, 59), (2026, 12, 9, 5, 59)),     # Mon 05:59 after Sun night
    ("sat,sun 10:00-24:00", (2026, 12, 6, 23, 59), (2026, 12, 7, 0, 0)),
])
def test_working_hours(text, open_at, closed_at):
    hours = bx24ast.WorkingHours.parse(text)
    at = lambda t: time.mktime(t + (0, 0, 0, -1))
    assert hours.is_open(at(open_at)) and not hours.is_open(at(closed_at))
    opening = hours.next_opening(at(closed_at))
    assert opening > at(closed_at) and hours.is_open(opening) and not hours.is_open(opening - 60)


def test_callerid_name_is_set_and_cannot_break_the_agi_command():
    with Bitrix24Emulator() as emu:
        emu.add_contact("+79161234567", 'Evil "Client"\nHANGUP\\', assigned=7)
        with Routing(emu, set_callerid_name=True) as r:
            commands = agi_session(r.agi.address[1], agi_env("89161234567"))
            assert commands[-1] == 'SET VARIABLE CALLERID(name) "Evil ClientHANGUP"'
            assert len(commands) == 5


def test_malformed_agi_input_and_hangups_are_survived():
    with Bitrix24Emulator() as emu:
        emu.add_contact("+79161234567", "Known Client", assigned=7)
        with Routing(emu) as r:
            port = r.agi.address[1]
            # not AGI at all
            assert agi_session(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n") == []
            # a line of 100 kB
            assert agi_session(port, b"agi_network: yes\n" + b"agi_x: " + b"A" * 100000 + b"\n\n") == []
            # the caller's side closes before the environment ends
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"agi_network: yes\nagi_callerid: 8916")
            s.close()
            # an unknown script gets no variables
            assert agi_session(port, agi_env(script="other")) == ['VERBOSE "bx24ast: unknown AGI script" 1']
            # the caller hangs up while we set variables: nothing more is sent
            hung = agi_session(port, agi_env("89161234567"), answer=lambda n, cmd: "HANGUP" if n == 1 else
                               "511 Command Not Permitted on a dead channel or intercept routine")
            assert len(hung) == 1 and hung[0].startswith("SET VARIABLE BX24_RESPONSIBLE_EXT")
            # an error answer ends the session too
            assert len(agi_session(port, agi_env("89161234567"), answer=lambda n, cmd: "520 Invalid command")) == 1
            # and the server still works
            assert r.ask("89161234567")["BX24_RESPONSIBLE_EXT"] == "102"


def test_fifty_concurrent_agi_sessions():
    with Bitrix24Emulator(rate=50, burst=100) as emu:
        for i in range(10):
            emu.add_contact("+7916000000%d" % i, "Client %d" % i, assigned=(5, 7, 9)[i % 3])
        with Routing(emu, budget=5.0) as r:
            results = {}

            def one(n):
                results[n] = r.ask("8916000000%d" % (n % 10))
            threads = [threading.Thread(target=one, args=(n,)) for n in range(50)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert len(results) == 50
            for n, found in results.items():
                assert found["BX24_RESPONSIBLE_EXT"] == ("101", "102", "103")[(n % 10) % 3], (n, found)
            assert len(searches(emu)) == 10  # one lookup per number, however many callers wait on it


def test_http_lookup_for_curl_dialplans():
    with Bitrix24Emulator() as emu:
        contact = emu.add_contact("+79161234567", "Known Client", assigned=7)
        with Routing(emu) as r:
            status, body = r.get("/responsible?number=89161234567")
            assert status == 200 and body["extension"] == "102" and body["user_id"] == "7"
            assert body["crm_entity"] == "CONTACT_%d" % contact and body["name"] == "Known Client"
            assert r.get("/responsible")[0] == 400
            assert "number" in r.get("/responsible")[1]["error"]
            assert r.get("/other")[0] == 404


# -- click-to-call ---------------------------------------------------------------------------------

class StubAmi(object):
    """An AMI that takes Originates; on_sent(action_id) plays what Asterisk answers in the
    reader thread before the sender runs on (a phone it cannot reach fails at once)."""

    def __init__(self, on_sent=None):
        self.originates = []
        self.on_sent = on_sent
        self._ids = 0

    def next_action_id(self):
        self._ids += 1
        return "id-%d" % self._ids

    def originate(self, channel, context, exten, action_id=None, **kw):
        self.originates.append(dict(kw, channel=channel, context=context, exten=exten))
        action_id = action_id or self.next_action_id()
        if self.on_sent is not None:
            self.on_sent(action_id)
        return bx24ast.PendingAction("Originate", action_id, None)


def click_settings(**over):
    settings = dict(bx24ast.Config.defaults().section("click_to_call"))
    settings.update(over)
    return settings


def make_click(tmp_path, **over):
    store = bx24ast.StateStore(str(tmp_path / "state.db"))
    users = bx24ast.UserDirectory(overrides={"101": 5, "102": 7})
    ami = StubAmi()
    click = bx24ast.ClickToCall(ami, users, store, bx24ast.Outbox(store), bx24ast.PbxRules.defaults(),
                                click_settings(**over))
    return click, ami, store


@pytest.mark.parametrize("number, dialled", [
    ("+7 (916) 123-45-67", "89161234567"),
    ("+7(916)1234567", "89161234567"),
    ("89161234567", "89161234567"),
    ("+44 20 7946 0958", "00442079460958"),
    ("102", "102"),
])
def test_click_numbers_are_normalised(tmp_path, number, dialled):
    click, ami, _ = make_click(tmp_path)
    ok, _ = click.start({"CALL_ID": "externalCall.abc.1", "USER_ID": "5", "PHONE_NUMBER": number}, "test")
    assert ok and ami.originates[0]["exten"] == dialled


@pytest.mark.parametrize("number", [
    "123\r\nAction: Command", "1;2", "12", "1" * 21, "9" * 200, "\u0669\u0661\u0666\u0661\u0662\u0663",
    "", "+", "89161234567\n", "8916*123", "${SHELL(rm -rf /)}", None, 89161234567,
])
def test_hostile_click_numbers_never_reach_ami(tmp_path, number):
    click, ami, store = make_click(tmp_path)
    ok, reason = click.start({"CALL_ID": "externalCall.abc.1", "USER_ID": "5", "PHONE_NUMBER": number},
                             "test")
    assert not ok and "PHONE_NUMBER" in reason and ami.originates == []


@pytest.mark.parametrize("data, field", [
    ({"CALL_ID": "x\r\nAction: Command", "USER_ID": "5", "PHONE_NUMBER": "89161234567"}, "CALL_ID"),
    ({"CALL_ID": "externalCall.abc.1", "USER_ID": "5; DROP", "PHONE_NUMBER": "89161234567"}, "USER_ID"),
    ({"CALL_ID": "externalCall.abc.1", "USER_ID": "99", "PHONE_NUMBER": "89161234567"}, "no extension"),
    ("not a dict", "data"),
])
def test_bad_click_fields_are_refused_by_name(tmp_path, data, field):
    click, ami, _ = make_click(tmp_path)
    ok, reason = click.start(data, "test")
    assert not ok and field in reason and ami.originates == []


def test_one_click_dials_once_and_a_stuck_button_is_held_back(tmp_path):
    click, ami, store = make_click(tmp_path)
    data = {"CALL_ID": "externalCall.abc.1", "USER_ID": "5", "PHONE_NUMBER": "89161234567"}
    assert click.start(data, "test")[0]
    assert not click.start(dict(data), "test")[0]           # the same click again
    again = dict(data, CALL_ID="externalCall.abc.2")
    ok, reason = click.start(again, "test")                  # a new click 0 s later
    assert not ok and "within" in reason
    assert len(ami.originates) == 1
    o = ami.originates[0]
    assert o["channel"] == "Local/101@from-internal" and o["context"] == "from-internal"
    assert o["variables"] == {"__BX24_CALL_ID": "externalCall.abc.1"}
    assert o["caller_id"] == '"89161234567" <101>'
    # the refused click's card is closed in Bitrix24
    closes = [r for r in bx24ast.Outbox(store).listing() if r.kind == "close"]
    assert len(closes) == 1 and closes[0].params["CALL_ID"] == "externalCall.abc.2"
    assert closes[0].params["STATUS_CODE"] == "603" and closes[0].params["USER_ID"] == 5
    # another user is not held back
    assert click.start(dict(data, CALL_ID="externalCall.abc.3", USER_ID="7"), "test")[0]


def test_php_form_parses_bitrix24_event_bodies():
    body = Bitrix24Emulator.event_form("OnExternalCallStart", {"CALL_ID": "c1", "PHONE_NUMBER": "+7 916"},
                                       "tok").decode()
    form = bx24ast.php_form(body)
    assert form["event"] == "ONEXTERNALCALLSTART" and form["data"]["CALL_ID"] == "c1"
    assert form["data"]["PHONE_NUMBER"] == "+7 916" and form["auth"]["application_token"] == "tok"
    assert bx24ast.php_form("a[b][c]=1&a[b][d]=2&x=&bad]=1") == {"a": {"b": {"c": "1", "d": "2"}}, "x": ""}


class Service(object):
    """A whole bx24ast.Daemon (AMI + Bitrix24 + listeners) in a thread."""

    def __init__(self, tmp_path, ami, emu, c2c, oauth=False):
        b24 = ("portal_url = %s/\nclient_id = %s\nclient_secret = %s\noauth_url = %s\n"
               % (emu.url, emu.client_id, emu.client_secret, emu.oauth_url)) if oauth else \
            "webhook_url = %s\n" % emu.webhook_url
        text = ("[ami]\nhost = 127.0.0.1\nport = %d\nusername = bx24\nsecret = s3cret\nreconnect_max_delay = 1\n"
                "[bitrix24]\n%srate = %s\nburst = %s\ntimeout = 5\n[routing]\nagi_listen =\nhttp_listen =\n"
                "[click_to_call]\n%s\n[crm]\ncallback_window_minutes = 0\n[cel]\nbackend = off\n"
                "[storage]\nstate_dir = %s\n[recordings]\npath = %s\nsettle_seconds = 0\n"
                % (ami.port, b24, emu.rate, emu.burst, "\n".join("%s = %s" % kv for kv in c2c.items()),
                   tmp_path, os.path.join(CLICK, "recordings")))
        self.config = bx24ast.Config.from_text(text)
        if oauth:
            store = bx24ast.StateStore.open_dir(str(tmp_path))
            bx24ast.BitrixClient.from_config(self.config, store).save_tokens(emu.issue_tokens())
            store.close()
        self.daemon = bx24ast.Daemon(self.config)
        self.thread = threading.Thread(target=self.daemon.run)

    def __enter__(self):
        self.thread.start()
        # users load in the sender's thread, the port-mode listener starts after it in run()
        port_mode = self.config.get("click_to_call", "mode") == "port"
        if not wait_for(lambda: self.daemon.bridge.users.loaded_at and (self.daemon.listeners or not port_mode), 10):
            self.__exit__()
            raise AssertionError("the daemon did not start: %s" % self.daemon.status())
        return self

    def __exit__(self, *exc):
        self.daemon.stop()
        self.thread.join(20)
        self.daemon.bridge.store.close()

    def post(self, body, path="/bitrix24"):
        port = self.daemon.listeners[0][1].address[1]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", path, body, {"Content-Type": "application/x-www-form-urlencoded"})
        resp = conn.getresponse()
        answer = resp.read()
        conn.close()
        return resp.status, answer


def originates(ami):
    return [a for a in ami.actions if a.get("Action") == "Originate"]


def test_click_to_call_port_mode_end_to_end(tmp_path):
    expected = load_expected(CLICK)["calls"][0]
    c2c = {"mode": "port", "listen": "127.0.0.1:0", "application_token": "t0ken-from-bitrix24",
           "phone_channel": "PJSIP/{extension}"}
    # played at twice the real speed: durations come from the events' arrival, as live
    with Bitrix24Emulator() as emu, FakeAmiServer(on_originate=CLICK, speed=2) as ami:
        with Service(tmp_path, ami, emu, c2c) as svc:
            data = emu.start_click(5, "+7 (916) 123-45-67")
            call_id = data["CALL_ID"]
            # a wrong or missing token: 403, nothing dialled
            assert svc.post(emu.event_form("ONEXTERNALCALLSTART", data, "guess"))[0] == 403
            assert svc.post(b"event=ONEXTERNALCALLSTART&data[CALL_ID]=x")[0] == 403
            # a hostile number with the right token: refused, nothing dialled
            evil = dict(data, PHONE_NUMBER="123\r\nAction: Command", PHONE_NUMBER_INTERNATIONAL="",
                        CALL_ID="externalCall.evil.1")
            status, answer = svc.post(emu.event_form("ONEXTERNALCALLSTART", evil, "t0ken-from-bitrix24"))
            assert status == 200 and b"refused" in answer
            assert originates(ami) == []
            # an event we do not handle
            assert svc.post(emu.event_form("ONCRMLEADADD", {}, "t0ken-from-bitrix24"))[0] == 400
            # the real click
            status, answer = svc.post(emu.event_form("ONEXTERNALCALLSTART", data, "t0ken-from-bitrix24"))
            assert status == 200 and b"originated" in answer
            assert wait_for(lambda: originates(ami), 10)
            sent = originates(ami)
            assert len(sent) == 1
            o = sent[0]
            assert o["Channel"] == "PJSIP/101" and o["Context"] == "from-internal"
            assert o["Exten"] == expected["external_number"] == "89161234567"
            assert o["Variable"] == "__BX24_CALL_ID=%s" % call_id
            # the call Asterisk then makes is finished under Bitrix24's CALL_ID, never registered again
            assert wait_for(lambda: call_id in emu.stats, 30), emu.journal[-5:]
            stat = emu.stats[call_id]
            assert stat["PORTAL_USER_ID"] == 5 and stat["CALL_FAILED_CODE"] == "200"
            assert abs(stat["CALL_DURATION"] - expected["first_bridge_to_hangup_s"] / 2) <= 1
            assert not [e for e in emu.journal if e["method"] == "telephony.externalcall.register"]
            assert wait_for(lambda: call_id in emu.records, 15)
            # Bitrix24 resends nothing, but a repeated POST must not dial again
            status, answer = svc.post(emu.event_form("ONEXTERNALCALLSTART", data, "t0ken-from-bitrix24"))
            assert status == 200 and b"already handled" in answer
            time.sleep(0.5)
            assert len(originates(ami)) == 1


def test_click_to_call_offline_mode_originates_once_and_clears(tmp_path):
    c2c = {"mode": "offline", "poll_interval": "0.5", "phone_channel": "PJSIP/{extension}"}
    with Bitrix24Emulator() as emu, FakeAmiServer(on_originate=CLICK) as ami:
        with Service(tmp_path, ami, emu, c2c, oauth=True) as svc:
            assert wait_for(lambda: svc.daemon.poller.bound, 10)
            assert {"event": "ONEXTERNALCALLSTART", "handler": "", "offline": 1} in emu.bindings
            data = emu.start_click(5, "89161234567", offline=True)
            assert wait_for(lambda: originates(ami), 10)
            assert wait_for(lambda: not emu.offline, 10)
            assert wait_for(lambda: data["CALL_ID"] in emu.stats, 30)
            assert not [e for e in emu.journal if e["method"] == "telephony.externalcall.register"]
            gets = [e for e in emu.journal if e["method"] == "event.offline.get"]
            assert gets and all(str(e["params"]["clear"]) == "0" for e in gets)
        assert len(originates(ami)) == 1


def test_offline_click_is_not_lost_nor_dialled_twice_across_a_restart(tmp_path):
    c2c = {"mode": "offline", "poll_interval": "0.5", "phone_channel": "PJSIP/{extension}"}
    with Bitrix24Emulator() as emu, FakeAmiServer() as ami:
        with Service(tmp_path, ami, emu, c2c, oauth=True) as svc:
            assert wait_for(lambda: svc.daemon.poller.bound, 10)
            emu.failures["event.offline.clear"] = 1000   # dies before the clear gets through
            emu.start_click(5, "89161234567", offline=True)
            assert wait_for(lambda: originates(ami), 10)
            assert wait_for(lambda: [e for e in emu.journal if e["method"] == "event.offline.clear"], 10)
        assert emu.offline  # still reserved on the portal
        emu.failures.clear()
        with Service(tmp_path, ami, emu, c2c, oauth=True) as svc:
            assert wait_for(lambda: not emu.offline, 10)
            got = [e for e in emu.journal if e["method"] == "event.offline.get"]
            assert any(e["params"].get("process_id") for e in got)   # re-read the reserved batch
        assert len(originates(ami)) == 1


def test_offline_poll_rides_in_the_outbox_batch(tmp_path):
    with Bitrix24Emulator() as emu:
        emu.issue_tokens()
        store = bx24ast.StateStore(str(tmp_path / "s.db"))
        client = bx24ast.BitrixClient(webhook_url=emu.webhook_url)
        users = bx24ast.UserDirectory(client, {"101": 5})
        users.loaded_at = time.time()
        outbox = bx24ast.Outbox(store)
        sender = bx24ast.OutboxSender(outbox, bx24ast.CallRecords(store), client, users, None, 1)
        sender._thread = True  # running, as far as backlog() is concerned
        for n in range(3):
            outbox.add("c%d" % n, "register", "telephony.externalcall.register",
                       {"USER_ID": 5, "PHONE_NUMBER": "+7916000000%d" % n, "TYPE": 2}, bx24ast.PRIORITY_CARD)
        assert sender.backlog()
        ride = sender.ride("user.get", {"FILTER": {"ACTIVE": True}})
        sender.step()
        assert ride.done.is_set() and ride.error is None and len(ride.result) == 4
        assert client.requests_sent == 1   # one HTTP request carried all four
        assert [e["method"] for e in emu.journal][0] == "batch"
        store.close()


def test_bind_events_cli_against_the_portal(tmp_path, capsys):
    with Bitrix24Emulator() as emu:
        conf = tmp_path / "bx24ast.conf"
        conf.write_text("[bitrix24]\nportal_url = %s/\nclient_id = %s\nclient_secret = %s\noauth_url = %s\n"
                        "[click_to_call]\nmode = port\napplication_token = abc\npublic_url = https://pbx.example.com:8077/b24\n"
                        "[storage]\nstate_dir = %s\n" % (emu.url, emu.client_id, emu.client_secret, emu.oauth_url,
                                                          tmp_path))
        config = bx24ast.Config.load(str(conf))
        store = bx24ast.StateStore.open_dir(str(tmp_path))
        bx24ast.BitrixClient.from_config(config, store).save_tokens(emu.issue_tokens())
        store.close()
        assert bx24ast.main(["-c", str(conf), "bind-events"]) == 0
        out = capsys.readouterr().out
        assert "ONEXTERNALCALLSTART -> https://pbx.example.com:8077/b24" in out
        assert {"event": "ONEXTERNALCALLSTART", "handler": "https://pbx.example.com:8077/b24", "offline": 0} \
            in emu.bindings
        assert bx24ast.main(["-c", str(conf), "bind-events"]) == 0   # again: already bound is fine
        assert len(emu.bindings) == 2
        assert bx24ast.main(["-c", str(conf), "bind-events", "--unbind"]) == 0
        assert emu.bindings == []


@pytest.mark.parametrize("refusal", ["emulator", "application-context"])
def test_bind_events_with_a_webhook_says_a_local_application_is_needed(tmp_path, capsys, monkeypatch,
                                                                         refusal):
    with Bitrix24Emulator() as emu:
        conf = tmp_path / "bx24ast.conf"
        conf.write_text("[bitrix24]\nwebhook_url = %s\n[click_to_call]\nmode = port\napplication_token = abc\n"
                        "public_url = https://pbx.example.com:8077/b24\n[storage]\nstate_dir = %s\n"
                        % (emu.webhook_url, tmp_path))
        if refusal == "application-context":
            # what a real portal answers (doc section 12): 400 ACCESS_DENIED
            def refuse(client, config, unbind=False):
                raise bx24ast.classify_error(400, {"error": "ACCESS_DENIED",
                                                   "error_description": "Application context required"},
                                             "event.bind")
            monkeypatch.setattr(bx24ast, "bind_events", refuse)
        assert bx24ast.main(["-c", str(conf), "bind-events"]) == 1
        err = capsys.readouterr().err
        assert "local application" in err and "outbound webhook" in err and "application_token" in err
        assert emu.bindings == []


def test_callback_form_rings_the_group_then_the_client(tmp_path):
    click, ami, _ = make_click(tmp_path)
    data = {"PHONE_NUMBER": "+7 916 555-44-33", "TEXT": "Call back the client", "VOICE": "ruinternalfemale",
            "CRM_ENTITY_TYPE": "LEAD", "CRM_ENTITY_ID": "12", "LINE_NUMBER": ""}
    ok, reason = click.handle_event("OnExternalCallBackStart", data, "test", "m1")
    assert not ok and "callback_extension" in reason and ami.originates == []
    click, ami, _ = make_click(tmp_path / "2", callback_extension="600")
    assert click.handle_event("OnExternalCallBackStart", data, "test", "m1")[0]
    assert not click.handle_event("OnExternalCallBackStart", data, "test", "m1")[0]   # the same record again
    assert len(ami.originates) == 1
    o = ami.originates[0]
    assert o["channel"] == "Local/600@from-internal" and o["exten"] == "89165554433"
    assert o["variables"] == {"__BX24_CALLBACK": "1"}
    evil = dict(data, PHONE_NUMBER="1;Action: Originate")
    assert not click.handle_event("OnExternalCallBackStart", evil, "test", "m2")[0]
    assert len(ami.originates) == 1


def test_a_callback_call_is_registered_as_type_4(tmp_path):
    from test_calls import Pbx
    from test_crm import Harness
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu) as h:
            pbx = Pbx(h.rules)
            pbx.tracker = h.tracker
            pbx.t = time.time()
            pbx.new("20.0", "Local/600@from-internal-00000001;1", "20.0", "from-internal", "600", "600", 0)
            pbx.send("VarSet", Variable="__BX24_CALLBACK", Value="1", **pbx.fields("20.0"))
            pbx.new("20.1", "PJSIP/101-00000002", "20.0", "from-internal", "s")
            pbx.dial("20.0", "20.1", "PJSIP/101")
            pbx.dialend("20.0", "20.1", "ANSWER")
            pbx.new("20.2", "PJSIP/trunk-00000003", "20.0", "from-trunk", "s")
            pbx.dial("20.0", "20.2", "89165554433@trunk")
            pbx.dialend("20.0", "20.2", "ANSWER")
            pbx.enter("20.2", "B1")
            pbx.enter("20.0", "B1")
            pbx.t += 30
            pbx.hangup("20.2")
            pbx.hangup("20.1")
            pbx.hangup("20.0")
            h.wait_idle()
            reg = [e for e in emu.journal if e["method"] == "telephony.externalcall.register"]
            assert len(reg) == 1 and str(reg[0]["params"]["TYPE"]) == "4"
            assert reg[0]["params"]["PHONE_NUMBER"] == "+79165554433"


def test_port_mode_over_https_with_the_configured_certificate(tmp_path):
    import shutil
    import ssl
    import subprocess
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.check_call(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                           "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    click, ami, _ = make_click(tmp_path)
    listener = bx24ast.EventListener(click, "tok", "127.0.0.1", 0, cert, key)
    listener.start()
    try:
        context = ssl.create_default_context(cafile=cert)
        context.check_hostname = False
        conn = http.client.HTTPSConnection("127.0.0.1", listener.address[1], timeout=10, context=context)
        data = {"CALL_ID": "externalCall.tls.1", "USER_ID": "5", "PHONE_NUMBER": "89161234567"}
        conn.request("POST", "/", Bitrix24Emulator.event_form("ONEXTERNALCALLSTART", data, "tok"),
                     {"Content-Type": "application/x-www-form-urlencoded"})
        assert conn.getresponse().status == 200
        conn.close()
        assert len(ami.originates) == 1
        # plain HTTP to the TLS port gets nothing
        plain = http.client.HTTPConnection("127.0.0.1", listener.address[1], timeout=5)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("POST", "/", b"event=x")
            plain.getresponse()
        assert len(ami.originates) == 1
    finally:
        listener.stop()
    with pytest.raises(bx24ast.ConfigError) as err:
        bx24ast.EventListener(click, "tok", "127.0.0.1", 0, str(tmp_path / "missing.pem"))
    assert "tls_cert" in str(err.value)
    with pytest.raises(bx24ast.ConfigError) as err:
        bx24ast.EventListener(click, "", "127.0.0.1", 0)
    assert "application_token" in str(err.value)


def test_lookup_answers_limited_at_once_when_the_rate_budget_is_spent():
    with Bitrix24Emulator() as emu:
        emu.add_contact("+79161234567", "Known Client", assigned=7)
        with Routing(emu) as r:
            r.client.bucket.level = r.client.bucket.capacity  # every request of the budget spent
            before = r.client.requests_sent
            found = r.ask("89161234567")
            assert found["BX24_RESPONSIBLE_STATUS"] == "LIMITED" and found["BX24_RESPONSIBLE_EXT"] == ""
            assert r.client.requests_sent == before and not searches(emu)
            assert not r.lookup._cache  # not remembered: the next call tries again


def test_a_phone_that_never_answers_closes_the_card(tmp_path):
    click, ami, store = make_click(tmp_path)
    click.start({"CALL_ID": "externalCall.na.1", "USER_ID": "5", "PHONE_NUMBER": "89161234567"}, "test")
    click.on_originate_response(bx24ast.Message({"ActionID": "id-1", "Response": "Failure", "Reason": "3"},
                                                True, "OriginateResponse"))
    closes = [r for r in bx24ast.Outbox(store).listing() if r.kind == "close"]
    assert len(closes) == 1 and closes[0].params == {"CALL_ID": "externalCall.na.1", "USER_ID": 5,
                                                      "DURATION": 0, "STATUS_CODE": "304"}
    # an answered originate, or one we did not send, closes nothing
    click.on_originate_response(bx24ast.Message({"ActionID": "id-1", "Response": "Failure", "Reason": "5"},
                                                True, "OriginateResponse"))
    assert len([r for r in bx24ast.Outbox(store).listing() if r.kind == "close"]) == 1


def test_a_phone_that_fails_before_the_originate_returns_still_closes_the_card(tmp_path):
    """chan_sip refuses SIP/101 with nobody registered at once: its OriginateResponse (and
    the action's own answer) can be read before the thread that sent it runs again."""
    click, ami, store = make_click(tmp_path)
    ami.on_sent = lambda action_id: click.on_originate_response(bx24ast.Message(
        {"ActionID": action_id, "Response": "Failure", "Reason": "0"}, True, "OriginateResponse"))
    assert click.start({"CALL_ID": "externalCall.fast.1", "USER_ID": "5", "PHONE_NUMBER": "89161234567"}, "test")[0]
    closes = [r for r in bx24ast.Outbox(store).listing() if r.kind == "close"]
    assert len(closes) == 1 and closes[0].params["CALL_ID"] == "externalCall.fast.1"
    assert click._originating == {}

    # the same for a refused action: its callback runs in the reader thread
    other = tmp_path / "other"
    other.mkdir()
    click2, ami2, store2 = make_click(other)
    refused = bx24ast.Message({"ActionID": "id-1", "Response": "Error", "Message": "Extension does not exist."},
                              False, "Error")

    def answered(action_id):
        pending = bx24ast.PendingAction("Originate", action_id, None)
        pending.response = refused
        click2._queued(pending)
    ami2.on_sent = answered
    assert click2.start({"CALL_ID": "externalCall.fast.2", "USER_ID": "5", "PHONE_NUMBER": "89161234567"}, "test")[0]
    closes = [r for r in bx24ast.Outbox(store2).listing() if r.kind == "close"]
    assert len(closes) == 1 and closes[0].params["STATUS_CODE"] == "603"
    store.close()
    store2.close()


def make_poller(tmp_path, emu, webhook=False):
    store = bx24ast.StateStore(str(tmp_path / "poll.db"))
    if webhook:
        client = bx24ast.BitrixClient(webhook_url=emu.webhook_url)
    else:
        client = bx24ast.BitrixClient(portal_url=emu.url + "/", client_id=emu.client_id,
                                      client_secret=emu.client_secret, oauth_url=emu.oauth_url, store=store)
        client.save_tokens(emu.issue_tokens())
    click, ami, _ = make_click(tmp_path)
    return bx24ast.OfflineEventPoller(client, click, store, interval=2.0), ami, store


def test_offline_binding_refused_to_a_webhook_is_said_clearly(tmp_path, caplog):
    with Bitrix24Emulator() as emu:
        poller, _, store = make_poller(tmp_path, emu, webhook=True)
        assert poller.bind() is False and emu.bindings == []
        assert "needs a local application authorised by an administrator" in caplog.text
        assert "WRONG_AUTH_TYPE" in caplog.text
        store.close()


def test_poller_slows_down_when_the_rate_budget_is_tight(tmp_path):
    with Bitrix24Emulator() as emu:
        poller, _, store = make_poller(tmp_path, emu)
        assert poller.poll_once() == 2.0 and poller.polls == 1
        poller.client.bucket.level = poller.client.bucket.capacity * 0.9
        wait = poller.poll_once()
        assert wait > 2.0 * 4 and poller.polls == 1   # no request spent on a poll
        store.close()


def test_poller_falls_back_to_clear_1_without_the_extended_plan(tmp_path, caplog):
    with Bitrix24Emulator() as emu:
        emu.offline_extended = False
        poller, ami, store = make_poller(tmp_path, emu)
        emu.bindings.append({"event": "ONEXTERNALCALLSTART", "handler": "", "offline": 1})
        emu.start_click(5, "89161234567", offline=True)
        poller.poll_once()
        assert poller.clear_mode == 1 and "can lose one click" in caplog.text
        poller.poll_once()
        assert len(ami.originates) == 1 and not emu.offline
        store.close()


def test_onappinstall_tokens_are_kept_only_when_the_portal_vouches_for_them(tmp_path):
    with Bitrix24Emulator() as emu:
        store = bx24ast.StateStore(str(tmp_path / "app.db"))
        client = bx24ast.BitrixClient(portal_url=emu.url + "/", client_id=emu.client_id,
                                      client_secret=emu.client_secret, oauth_url=emu.oauth_url, store=store)
        click, ami, _ = make_click(tmp_path)
        listener = bx24ast.EventListener(click, "", "127.0.0.1", 0, client=client)
        listener.start()

        def post(event, data, auth):
            body = Bitrix24Emulator.event_form(event, data, auth.get("application_token", ""))
            body += b"&" + "&".join("auth[%s]=%s" % kv for kv in auth.items() if kv[0] != "application_token").encode()
            conn = http.client.HTTPConnection("127.0.0.1", listener.address[1], timeout=10)
            conn.request("POST", "/", body, {"Content-Type": "application/x-www-form-urlencoded"})
            status = conn.getresponse().status
            conn.close()
            return status
        try:
            click_data = {"CALL_ID": "externalCall.app.1", "USER_ID": "5", "PHONE_NUMBER": "89161234567"}
            # before the install no token is known: events are refused
            assert post("ONEXTERNALCALLSTART", click_data, {"application_token": "apptoken123"}) == 403
            # forged tokens: app.info refuses them, nothing is stored
            forged = {"access_token": "f" * 32, "refresh_token": "r" * 32, "application_token": "evil",
                      "client_endpoint": "https://attacker.example/rest/"}
            assert post("ONAPPINSTALL", {"VERSION": "1"}, forged) == 403
            assert client.tokens() == {}
            # the real install
            issued = emu.issue_tokens()
            auth = dict((k, str(v)) for k, v in issued.items())
            auth["client_endpoint"] = "https://attacker.example/rest/"
            assert post("ONAPPINSTALL", {"VERSION": "1"}, auth) == 200
            kept = client.tokens()
            assert kept["access_token"] == issued["access_token"] and kept["application_token"] == "apptoken123"
            assert kept["client_endpoint"] == emu.url + "/rest/"   # the configured portal, not the POSTed one
            # and now the portal's events carry the token that came with the install
            assert post("ONEXTERNALCALLSTART", click_data, {"application_token": "apptoken123"}) == 200
            assert len(ami.originates) == 1
        finally:
            listener.stop()
            store.close()
        # tokens of another application are refused too
        other = bx24ast.BitrixClient(portal_url=emu.url + "/", client_id="local.someone.else", client_secret="x",
                                     oauth_url=emu.oauth_url, store=bx24ast.StateStore(":memory:"))
        with pytest.raises(bx24ast.BitrixRejected) as err:
            other.install(dict((k, str(v)) for k, v in emu.issue_tokens().items()))
        assert "not [bitrix24] client_id local.someone.else" in str(err.value)
