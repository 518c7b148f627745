"""The call engine against real Asterisk captures, and its rules on their own."""
import collections
import json
import os
import subprocess
import sys

import pytest

import bx24ast
from conftest import ROOT, load_expected, scenario_dirs, scenario_id


def replay(path, rules=None, include_internal=True):
    rules = rules or bx24ast.PbxRules.defaults()
    calls = []

    def on_call_event(kind, call, extension):
        if kind == "ended" and bx24ast.is_reportable(call, rules, include_internal):
            calls.append(call.as_dict(rules.number_plan))

    tracker = bx24ast.CallTracker(rules, on_call_event)
    assert bx24ast.replay_capture(bx24ast.Capture(path), tracker)
    assert not tracker.calls, "calls left open at the end of the capture"
    return calls


def expected_row(call, plan):
    """What replay must print for one expected.json call (see the fixtures' README)."""
    direction = call["direction"]
    if direction == "outbound":
        # expected.json says "remote" answered; our answered_by is the employee on the call.
        answered_by = call["extension"] if call["answered_by"] else None
    else:
        answered_by = call["answered_by"]
    talk = call["first_bridge_to_hangup_s"]
    return {
        "linkedid": call["linkedid"],
        "direction": direction,
        "external_number": plan.normalize(call["external_number"]) if direction != "internal" else None,
        "did": call["did"],
        "rang": call["rang_extensions"],
        "answered_by": answered_by,
        "ended_with": call["final_extension"],
        "transfers": call.get("transfers") or [],
        "disposition": call["disposition"],
        "billsec": talk,
        "recording": call["recording_file"],
    }


def rules_without_contexts():
    """A PBX whose context names bx24ast has never heard of: no context rule matches."""
    rules = bx24ast.PbxRules.defaults()
    rules.inbound_contexts = rules.internal_contexts = None
    return rules


@pytest.mark.parametrize("contexts", ["default-rules", "no-context-rules"])
@pytest.mark.parametrize("path", scenario_dirs(), ids=scenario_id)
def test_replay_reproduces_expected(path, contexts):
    expected = load_expected(path)
    plan = bx24ast.NumberPlan()
    rules = rules_without_contexts() if contexts == "no-context-rules" else None
    got = {c["linkedid"]: c for c in replay(path, rules)}
    assert sorted(got) == sorted(c["linkedid"] for c in expected["calls"])
    for call in expected["calls"]:
        want = expected_row(call, plan)
        row = got[call["linkedid"]]
        for key, value in want.items():
            if key == "billsec":
                if value is None:
                    assert row["billsec"] == 0, call["linkedid"]
                else:
                    assert abs(row["billsec"] - value) <= 1, (call["linkedid"], row["billsec"], value)
            else:
                assert row[key] == value, (call["linkedid"], key, row[key], value)
        if call["answered_at_s"] is not None:
            assert row["answered_at"] is not None
        assert row["started_at"] and row["ended_at"]


def test_replay_command_prints_json_lines():
    path = os.path.join(ROOT, "tests", "fixtures", "asterisk-22.10.1-pjsip", "concurrent_burst")
    out = subprocess.check_output([sys.executable, os.path.join(ROOT, "bx24ast.py"), "replay", path])
    rows = [json.loads(line) for line in out.decode().splitlines()]
    assert len(rows) == 20
    assert collections.Counter(r["disposition"] for r in rows) == {"ANSWERED": 15, "NO ANSWER": 5}
    for row in rows:
        for key in ("linkedid", "direction", "external_number", "did", "rang", "answered_by",
                    "ended_with", "transfers", "disposition", "billsec", "started_at",
                    "answered_at", "ended_at", "recording"):
            assert key in row


def test_internal_calls_only_with_flag():
    path = os.path.join(ROOT, "tests", "fixtures", "asterisk-22.10.1-pjsip", "internal_call")
    script = os.path.join(ROOT, "bx24ast.py")
    plain = subprocess.check_output([sys.executable, script, "replay", path])
    assert plain.strip() == b""
    rows = subprocess.check_output([sys.executable, script, "replay", path, "--include-internal"])
    assert json.loads(rows)["direction"] == "internal"


# -- rules on their own ---------------------------------------------------------------------

@pytest.mark.parametrize("raw, want", [
    ("89161234567", "+79161234567"), ("79161234567", "+79161234567"), ("+79161234567", "+79161234567"),
    ("9161234567", "+79161234567"), ("8 (916) 123-45-67", "+79161234567"),
    ("81049301234567", "+49301234567"), ("0049301234567", "+49301234567"),
    ("112", "112"), ("<unknown>", None), ("anonymous", None), ("", None), (None, None),
])
def test_number_plan_russia(raw, want):
    assert bx24ast.NumberPlan().normalize(raw) == want


def test_number_plan_other_countries():
    uk = bx24ast.NumberPlan("44", "0", 10, "00")
    assert uk.normalize("02079460000") == "+442079460000"
    us = bx24ast.NumberPlan("1", "1", 10, "011")
    assert us.normalize("2125550100") == "+12125550100"
    assert us.normalize("12125550100") == "+12125550100"


OFFICE_RULES = """
[numbers]
outside_line = ^9(8\\d{10}|\\+\\d{11,14}|810\\d{8,})$ => \\1
plus_eight = ^\\+8(\\d{10})$ => +7\\1
city = ^([1-9]\\d{6})$ => 8495\\1
branch = ^(2\\d{3})$ => +7495777\\1
"""


# Numbers as real trunks and CRM cards write them, with an office's [numbers] rules.
@pytest.mark.parametrize("raw, want", [
    ("8 (495) 123-45-67", "+74951234567"), ("+7 495 123-45-67", "+74951234567"),
    ("00 7 495 123 45 67", "+74951234567"), ("810 7 495 1234567", "+74951234567"),
    ("7 495 123 45 67", "+74951234567"), ("(495) 123-45-67", "+74951234567"),
    ("4951234567", "+74951234567"), ("+8 495 123-45-67", "+74951234567"),   # +8: a trunk's mistake
    ("9 8 495 123-45-67", "+74951234567"), ("9+74951234567", "+74951234567"),   # outside-line 9 left in
    ("98104930123456", "+4930123456"), ("123-45-67", "+74951234567"),           # a city number of 7 digits
    ("2345", "+74957772345"),                                                    # a branch's short number
    ("112", "112"), ("0123456", "0123456"),   # not city numbers: the rules leave them alone
    ("+44 20 7946 0000", "+442079460000"), ("anonymous", None), ("", None),
])
def test_number_rules_table(raw, want):
    config = bx24ast.Config.from_text(OFFICE_RULES)
    plan = bx24ast.PbxRules.from_config(config).number_plan
    assert plan.normalize(raw) == want


def test_number_rules_apply_in_order_first_match_wins():
    config = bx24ast.Config.from_text("[numbers]\nfirst = ^5(\\d+)$ => 1\\1\nsecond = ^5(\\d+)$ => 2\\1\n")
    assert bx24ast.PbxRules.from_config(config).number_plan.normalize("5555") == "1555"


@pytest.mark.parametrize("line, words", [
    ("x = ^9(\\d+)$", ["[numbers] x", "PATTERN => REPLACEMENT"]),
    ("x = ^9(\\d+$ => \\1", ["[numbers] x", "valid pattern"]),
    ("x = ^9(\\d+)$ => \\2", ["[numbers] x", "invalid group reference"]),
    ("x = ^9(\\d+)$ => abc", ["[numbers] x", "digits, + and groups"]),
    ("x = ^9(\\d+)$ =>", ["[numbers] x", "PATTERN => REPLACEMENT"]),
])
def test_number_rules_refused_with_the_rule_named(line, words):
    with pytest.raises(bx24ast.ConfigError) as err:
        bx24ast.Config.from_text("[numbers]\n%s\n" % line)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("name, ext", [
    ("PJSIP/101-0000001a", "101"), ("SIP/102-00000003", "102"), ("IAX2/103-12345", "103"),
    ("Local/101@from-queue-00000004;1", "101"), ("Local/101#@from-internal-00000004;2", "101"),
    ("PJSIP/trunk-operator-00000000", None), ("Local/89161234567@from-internal-00000008;1", None),
    ("DAHDI/1-1", None), ("Local/s@macro-dial-00000001;1", None),
])
def test_extension_of_channel(rules, name, ext):
    assert rules.extension_of_channel(name) == ext


def test_trunk_channels_are_never_extensions():
    config = bx24ast.Config.from_text("[pbx]\ntrunk_channels = SIP/100-.*\n")
    rules = bx24ast.PbxRules.from_config(config)
    assert rules.extension_of_channel("SIP/100-0000001") is None
    assert rules.is_external_leg("SIP/100-0000001")


# -- synthetic event streams -------------------------------------------------------------------

class Pbx(object):
    """Writes AMI events the way Asterisk 22 does, for scenarios no capture holds."""

    def __init__(self, rules=None, base=1000.0):
        self.base = base
        self.t = base
        self.rules = rules or bx24ast.PbxRules.defaults()
        self.events = []
        self.tracker = bx24ast.CallTracker(self.rules, self._on)
        self.chans = {}

    def _on(self, kind, call, ext):
        self.events.append((kind, call.linkedid, ext, call))

    def at(self, t):
        self.t = self.base + t
        return self

    def send(self, name, **headers):
        h = {"Event": name}
        h.update((k, str(v)) for k, v in headers.items())
        self.tracker.handle(bx24ast.Message(h, True, name, self.t))

    def fields(self, uid, prefix=""):
        c = self.chans[uid]
        return dict((prefix + k, v) for k, v in c.items())

    def new(self, uid, name, linkedid, context="from-internal", exten="s", cid="", state=0):
        self.chans[uid] = {"Channel": name, "Uniqueid": uid, "Linkedid": linkedid, "Context": context,
                           "Exten": exten, "CallerIDNum": cid or "<unknown>", "ChannelState": state}
        self.send("Newchannel", **self.fields(uid))

    def dial(self, src, dest, dialstring=""):
        headers = self.fields(dest, "Dest")
        if src:
            headers.update(self.fields(src))
        self.send("DialBegin", DialString=dialstring, **headers)

    def dialend(self, src, dest, status):
        headers = self.fields(dest, "Dest")
        if src:
            headers.update(self.fields(src))
        self.send("DialEnd", DialStatus=status, **headers)

    def enter(self, uid, bridge):
        self.send("BridgeEnter", BridgeUniqueid=bridge, **self.fields(uid))

    def leave(self, uid, bridge):
        self.send("BridgeLeave", BridgeUniqueid=bridge, **self.fields(uid))

    def hangup(self, uid, cause=16):
        self.send("Hangup", Cause=cause, **self.fields(uid))

    def relink(self, uid, linkedid):
        self.chans[uid]["Linkedid"] = linkedid

    def ended(self):
        return dict((lid, call.as_dict(self.rules.number_plan))
                    for kind, lid, ext, call in self.events if kind == "ended")


def test_inbound_busy_extension():
    pbx = Pbx()
    pbx.new("1.0", "PJSIP/trunk-00000001", "1.0", "from-trunk", "74957654321", "89161234567", 4)
    pbx.new("1.1", "PJSIP/103-00000002", "1.0")
    pbx.dial("1.0", "1.1", "103")
    pbx.at(0.2).dialend("1.0", "1.1", "BUSY")
    pbx.hangup("1.1", 17)
    pbx.at(5).hangup("1.0", 17)
    row = pbx.ended()["1.0"]
    assert (row["direction"], row["external_number"], row["did"], row["rang"]) == \
        ("inbound", "+79161234567", "74957654321", ["103"])
    assert (row["disposition"], row["billsec"], row["answered_by"], row["ended_with"]) == ("BUSY", 0, None, None)


@pytest.mark.parametrize("status, disposition", [("NOANSWER", "NO ANSWER"), ("CANCEL", "NO ANSWER"),
                                                  ("BUSY", "BUSY"), ("CHANUNAVAIL", "FAILED"),
                                                  ("CONGESTION", "FAILED")])
def test_outbound_not_answered(status, disposition):
    pbx = Pbx()
    pbx.new("2.0", "PJSIP/101-00000001", "2.0", "from-internal", "89161234567", "101", 4)
    pbx.new("2.1", "PJSIP/trunk-00000002", "2.0", "from-trunk", "s")
    pbx.dial("2.0", "2.1", "89161234567@trunk")
    pbx.at(20).dialend("2.0", "2.1", status)
    pbx.hangup("2.1")
    pbx.hangup("2.0")
    row = pbx.ended()["2.0"]
    assert (row["direction"], row["external_number"], row["rang"]) == ("outbound", "+79161234567", [])
    assert (row["disposition"], row["billsec"], row["answered_by"], row["ended_with"]) == (disposition, 0, None, None)
    assert [e[:3] for e in pbx.events] == [("ringing", "2.0", "101"), ("ended", "2.0", None)]


def test_outbound_dialled_but_no_trunk_channel_is_failed():
    pbx = Pbx()
    pbx.new("2.0", "PJSIP/101-00000001", "2.0", "from-internal", "89161234567", "101", 4)
    pbx.at(3).hangup("2.0")
    row = pbx.ended()["2.0"]
    assert (row["direction"], row["external_number"], row["disposition"]) == ("outbound", "+79161234567", "FAILED")


def _answered_inbound(pbx):
    pbx.new("3.0", "PJSIP/trunk-00000001", "3.0", "from-trunk", "74951234567", "+79161234567", 4)
    pbx.new("3.1", "PJSIP/101-00000002", "3.0")
    pbx.dial("3.0", "3.1", "101")
    pbx.at(2).dialend("3.0", "3.1", "ANSWER")
    pbx.enter("3.1", "B1")
    pbx.enter("3.0", "B1")


@pytest.mark.parametrize("event_first", [False, True], ids=["merge-then-event", "event-then-merge"])
def test_attended_transfer(event_first):
    """Atxfer as Asterisk 22 does it: the consultation leg is a Local/102@from-internal
    pair with the call's linkedid; on completion the bridges merge."""
    pbx = Pbx()
    _answered_inbound(pbx)
    pbx.at(5).leave("3.1", "B1")
    pbx.send("Hold", **pbx.fields("3.0"))
    pbx.new("3.2", "Local/102@from-internal-00000003;1", "3.0", "from-internal", "102")
    pbx.new("3.3", "Local/102@from-internal-00000003;2", "3.0", "from-internal", "102", state=4)
    pbx.enter("3.1", "B2")
    pbx.enter("3.2", "B2")
    pbx.new("3.4", "PJSIP/102-00000004", "3.0")
    pbx.dial("3.3", "3.4", "102")
    pbx.at(8).dialend("3.3", "3.4", "ANSWER")
    pbx.enter("3.4", "B3")
    pbx.enter("3.3", "B3")
    pbx.at(12)
    xfer = dict(OrigTransfererUniqueid="3.1", OrigTransfererChannel="PJSIP/101-00000002",
                SecondTransfererUniqueid="3.1", TransfereeUniqueid="3.0", TransferTargetUniqueid="3.2",
                DestType="Bridge", DestBridgeUniqueid="B1", Result="Success", IsExternal="No")
    if event_first:
        pbx.send("AttendedTransfer", **xfer)
    pbx.leave("3.1", "B2")
    pbx.send("BridgeMerge", FromBridgeUniqueid="B2", ToBridgeUniqueid="B1")
    if not event_first:
        pbx.send("AttendedTransfer", **xfer)
    pbx.hangup("3.1")
    pbx.at(30).hangup("3.0")
    for uid in ("3.2", "3.3", "3.4"):
        pbx.hangup(uid)
    row = pbx.ended()["3.0"]
    assert row["rang"] == ["101", "102"]
    assert row["answered_by"] == "101" and row["ended_with"] == "102"
    assert row["transfers"] == [{"type": "attended", "from": "101", "to": "102"}]
    assert row["billsec"] == 28 and row["disposition"] == "ANSWERED"
    kinds = [(k, e) for k, _, e, _ in pbx.events]
    assert ("answered", "101") in kinds and ("transferred", "102") in kinds


def test_transfer_by_phone_relinks_the_consultation_call():
    """A desk phone's own transfer: the consultation is a separate internal call, then
    Asterisk re-links its channels to the client's call."""
    pbx = Pbx()
    _answered_inbound(pbx)
    pbx.at(4).leave("3.1", "B1")
    pbx.new("4.0", "PJSIP/101-00000005", "4.0", "from-internal", "102", "101", 4)
    pbx.new("4.1", "PJSIP/102-00000006", "4.0")
    pbx.dial("4.0", "4.1", "102")
    pbx.at(6).dialend("4.0", "4.1", "ANSWER")
    pbx.enter("4.1", "B4")
    pbx.enter("4.0", "B4")
    pbx.at(9).leave("4.1", "B4")
    pbx.relink("4.1", "3.0")
    pbx.send("AttendedTransfer", OrigTransfererUniqueid="3.1", SecondTransfererUniqueid="4.0",
             TransfereeUniqueid="3.0", TransferTargetUniqueid="4.1", Result="Success", DestType="Link")
    pbx.enter("4.1", "B1")
    pbx.hangup("3.1")
    pbx.leave("4.0", "B4")
    pbx.hangup("4.0")
    pbx.at(20).hangup("3.0")
    pbx.hangup("4.1")
    ended = pbx.ended()
    row = ended["3.0"]
    assert row["ended_with"] == "102" and row["transfers"] == [{"type": "attended", "from": "101", "to": "102"}]
    assert ended["4.0"]["direction"] == "internal"
    assert not pbx.tracker.calls and not pbx.tracker.channels and not pbx.tracker.bridges


def test_queue_with_local_members_rings_each_extension_once():
    """FreePBX queues dial Local/101@from-queue/n, whose second half dials PJSIP/101."""
    pbx = Pbx()
    pbx.new("5.0", "PJSIP/trunk-00000001", "5.0", "from-pstn", "s", "79161234567", 4)
    pbx.send("VarSet", Variable="__FROM_DID", Value="74951234567", **pbx.fields("5.0"))
    pbx.new("5.1", "Local/101@from-queue-00000002;1", "5.0", "from-queue", "101")
    pbx.new("5.2", "Local/101@from-queue-00000002;2", "5.0", "from-queue", "101", state=4)
    pbx.dial("5.0", "5.1", "Local/101@from-queue/n")
    pbx.new("5.3", "PJSIP/101-00000003", "5.0")
    pbx.dial("5.2", "5.3", "PJSIP/101")
    pbx.at(4).dialend("5.2", "5.3", "ANSWER")
    pbx.enter("5.3", "B2")
    pbx.enter("5.2", "B2")
    pbx.dialend("5.0", "5.1", "ANSWER")
    pbx.enter("5.1", "B1")
    pbx.enter("5.0", "B1")
    pbx.at(10)
    for uid in ("5.0", "5.1", "5.2", "5.3"):
        pbx.hangup(uid)
    row = pbx.ended()["5.0"]
    assert row["did"] == "74951234567" and row["external_number"] == "+79161234567"
    assert row["rang"] == ["101"] and row["answered_by"] == "101" and row["billsec"] == 6
    assert [e[:3] for e in pbx.events].count(("ringing", "5.0", "101")) == 1
    tracker = pbx.tracker
    assert not (tracker.calls or tracker.channels or tracker.bridges or tracker.local_pairs)


def test_call_without_hangup_expires():
    pbx = Pbx()
    pbx.new("6.0", "PJSIP/trunk-00000001", "6.0", "from-trunk", "74951234567", "+79161234567", 4)
    pbx.new("6.1", "PJSIP/101-00000002", "6.0")
    pbx.dial("6.0", "6.1", "101")
    pbx.tracker.expire(1000.0 + 3600)
    assert pbx.tracker.calls
    pbx.tracker.expire(1000.0 + 13 * 3600)
    assert not pbx.tracker.calls and not pbx.tracker.channels
    [(kind, lid, ext, call)] = [e for e in pbx.events if e[0] == "ended"]
    assert call.expired and call.disposition == "NO ANSWER"


def test_late_events_do_not_resurrect_a_channel():
    pbx = Pbx()
    pbx.new("7.0", "PJSIP/trunk-00000001", "7.0", "from-trunk", "74951234567", "+79161234567", 4)
    pbx.hangup("7.0")
    pbx.send("VarSet", Variable="MIXMONITOR_FILENAME", Value="/x.wav", **pbx.fields("7.0"))
    assert not pbx.tracker.calls


def test_resync_hangs_up_vanished_channels_and_adopts_new_ones():
    pbx = Pbx()
    _answered_inbound(pbx)
    # while we were away: 101 hung up, and a new inbound call started and was answered
    show = [bx24ast.Message({"Event": "CoreShowChannel", "Channel": "PJSIP/trunk-00000001",
                             "Uniqueid": "3.0", "Linkedid": "3.0", "Context": "ext-group", "Exten": "600",
                             "ChannelState": "6", "BridgeId": "B1", "Duration": "00:00:10"}, True,
                            "CoreShowChannel", None),
            bx24ast.Message({"Event": "CoreShowChannel", "Channel": "PJSIP/trunk-00000009",
                             "Uniqueid": "8.0", "Linkedid": "8.0", "Context": "from-trunk",
                             "Exten": "74957654321", "CallerIDNum": "+79160000000", "ChannelState": "6",
                             "BridgeId": "B9", "Duration": "00:01:00"}, True, "CoreShowChannel", None),
            bx24ast.Message({"Event": "CoreShowChannel", "Channel": "PJSIP/103-0000000a",
                             "Uniqueid": "8.1", "Linkedid": "8.0", "Context": "from-internal", "Exten": "",
                             "ChannelState": "6", "BridgeId": "B9", "Duration": "00:00:50"}, True,
                            "CoreShowChannel", None)]
    pbx.tracker.resync(show, 1000.0 + 60, gone_at=1000.0 + 40)
    assert "3.1" not in pbx.tracker.channels
    new = pbx.tracker.calls["8.0"]
    assert new.direction == "inbound" and new.answered_by == "103" and new.did == "74957654321"
    assert abs(new.started_at - 1000.0) < 1
    pbx.at(70).hangup("3.0")
    pbx.chans["8.0"] = {"Channel": "PJSIP/trunk-00000009", "Uniqueid": "8.0", "Linkedid": "8.0"}
    pbx.chans["8.1"] = {"Channel": "PJSIP/103-0000000a", "Uniqueid": "8.1", "Linkedid": "8.0"}
    pbx.at(90).hangup("8.1")
    pbx.hangup("8.0")
    ended = pbx.ended()
    assert ended["3.0"]["answered_by"] == "101" and ended["3.0"]["disposition"] == "ANSWERED"
    assert ended["8.0"]["external_number"] == "+79160000000" and ended["8.0"]["billsec"] == 30


def test_ignored_numbers_are_not_reportable():
    config = bx24ast.Config.from_text("[pbx]\nignore_numbers = \\+7495000.*|\\*97\n")
    rules = bx24ast.PbxRules.from_config(config)
    pbx = Pbx(rules)
    pbx.new("9.0", "PJSIP/trunk-00000001", "9.0", "from-trunk", "74951234567", "84950001122", 4)
    pbx.hangup("9.0")
    call = [e[3] for e in pbx.events if e[0] == "ended"][0]
    assert not bx24ast.is_reportable(call, rules)


def test_click_to_call_carries_the_bitrix_call_id():
    pbx = Pbx()
    pbx.new("10.0", "PJSIP/101-00000001", "10.0", "from-internal", "s", "101", 0)
    pbx.send("VarSet", Variable="__BX24_CALL_ID", Value="externalCall.abc123.1700000000",
             **pbx.fields("10.0"))
    pbx.dial(None, "10.0", "101")
    pbx.at(3).dialend(None, "10.0", "ANSWER")
    pbx.chans["10.0"]["Exten"] = "89161234567"
    pbx.new("10.1", "PJSIP/trunk-00000002", "10.0", "from-trunk", "s")
    pbx.dial("10.0", "10.1", "89161234567@trunk")
    pbx.at(6).dialend("10.0", "10.1", "ANSWER")
    pbx.enter("10.1", "B1")
    pbx.enter("10.0", "B1")
    pbx.at(16).hangup("10.1")
    pbx.hangup("10.0")
    row = pbx.ended()["10.0"]
    assert row["click_to_call"] and row["call_id"] == "externalCall.abc123.1700000000"
    assert (row["direction"], row["rang"], row["answered_by"], row["billsec"]) == ("outbound", ["101"], "101", 10)


def _time_stripped_copy(tmp_path, keep_sidecar):
    """A live capture as an AMI user without 'system'/'security' rights records it: no
    event carries its own time, and the sidecar (if any) has no wall clock."""
    src = os.path.join(ROOT, "tests", "fixtures", "asterisk-22.10.1-live", "inbound_answered")
    with open(os.path.join(src, "ami.log"), "rb") as f:
        data = f.read().replace(b"EventTV:", b"EventTX:").replace(b"Timestamp:", b"Timestampx")
    (tmp_path / "ami.log").write_bytes(data)
    if keep_sidecar:
        with open(os.path.join(src, "ami.timestamps.jsonl")) as f, \
                open(str(tmp_path / "ami.timestamps.jsonl"), "w") as out:
            for line in f:
                rec = json.loads(line)
                rec.pop("wall", None)
                out.write(json.dumps(rec) + "\n")
    return str(tmp_path), load_expected(src)["calls"][0]


@pytest.mark.parametrize("keep_sidecar", [True, False], ids=["sidecar-without-wall", "no-sidecar"])
def test_replay_times_come_from_the_stream_never_1970(tmp_path, keep_sidecar):
    path, want = _time_stripped_copy(tmp_path, keep_sidecar)
    (row,) = replay(path)
    started = bx24ast.parse_iso_time(row["started_at"])
    # the Uniqueid is Asterisk's clock (whole seconds) when the call's first channel was made
    assert abs(started - int(want["linkedid"].split(".")[0])) <= 1.5
    assert row["ended_at"] >= row["started_at"]
    if keep_sidecar:
        assert abs(row["billsec"] - want["first_bridge_to_hangup_s"]) <= 1


def test_transfer_of_an_answered_call_to_an_outside_number_stays_with_the_employee():
    """101 answered, then sent the client to a mobile (the trunk leg dials out): the
    outside number answering is still 101's call, not the last phone that rang (102)."""
    pbx = Pbx()
    pbx.new("5.0", "PJSIP/trunk-00000001", "5.0", "from-trunk", "74951234567", "89161234567", 4)
    pbx.new("5.1", "PJSIP/101-00000002", "5.0")
    pbx.new("5.2", "PJSIP/102-00000003", "5.0")
    pbx.dial("5.0", "5.1", "101")
    pbx.dial("5.0", "5.2", "102")
    pbx.at(2).dialend("5.0", "5.1", "ANSWER")
    pbx.dialend("5.0", "5.2", "CANCEL")
    pbx.hangup("5.2", 26)
    pbx.enter("5.1", "b1")
    pbx.enter("5.0", "b1")
    pbx.at(6).leave("5.0", "b1")
    pbx.hangup("5.1")
    pbx.new("5.3", "PJSIP/trunk-00000004", "5.0", "from-trunk", "s", "", 0)
    pbx.dial("5.0", "5.3", "89162223344@trunk")
    pbx.at(9).dialend("5.0", "5.3", "ANSWER")
    pbx.enter("5.3", "b2")
    pbx.enter("5.0", "b2")
    pbx.at(15).hangup("5.3")
    pbx.hangup("5.0")
    row = pbx.ended()["5.0"]
    assert (row["answered_by"], row["ended_with"], row["disposition"], row["billsec"]) == \
        ("101", "101", "ANSWERED", 13)


def test_a_root_channel_that_dials_without_ringing_in_still_starts_the_call():
    """Some drivers never report Ring for an incoming call (Down, then the dialplan runs)."""
    pbx = Pbx()
    pbx.new("6.0", "DAHDI/i1/74951234567-1", "6.0", "from-pstn", "74951234567", "89161234567", 0)
    pbx.new("6.1", "PJSIP/101-00000002", "6.0")
    pbx.dial("6.0", "6.1", "101")
    pbx.at(3).dialend("6.0", "6.1", "ANSWER")
    pbx.enter("6.1", "b1")
    pbx.enter("6.0", "b1")
    pbx.at(8).hangup("6.0")
    pbx.hangup("6.1")
    row = pbx.ended()["6.0"]
    assert (row["direction"], row["external_number"], row["answered_by"], row["billsec"]) == \
        ("inbound", "+79161234567", "101", 5)
    assert ("ringing", "6.0", "101") in [(k, l, e) for k, l, e, _ in pbx.events]


# -- employees' mobiles ([users] 102 = 7, +79162223344) ------------------------------------------

def mobile_rules(**pbx):
    text = "[users]\n101 = 5\n102 = 7, 8 (916) 222-33-44\n[pbx]\n%s" % "".join(
        "%s = %s\n" % kv for kv in pbx.items())
    return bx24ast.PbxRules.from_config(bx24ast.Config.from_text(text))


def ring_group_with_a_mobile(pbx, lid, number, talk=10):
    """A ring group of 101 and 89162223344# (FreePBX rings an outside member as
    Local/<number>#@from-internal); the mobile answers after 3 s."""
    phone, mobile = lid + "1", lid + "2"
    pbx.new(lid, "PJSIP/trunk-00000001", lid, "from-trunk", "74951234567", number, 4)
    pbx.new(phone, "PJSIP/101-00000002", lid)
    pbx.new(mobile, "Local/89162223344#@from-internal-00000003;1", lid)
    pbx.dial(lid, phone, "PJSIP/101")
    pbx.dial(lid, mobile, "Local/89162223344#@from-internal")
    start = pbx.t - pbx.base
    pbx.at(start + 3).dialend(lid, mobile, "ANSWER")
    pbx.dialend(lid, phone, "CANCEL")
    pbx.hangup(phone)
    pbx.enter(mobile, "B" + lid)
    pbx.enter(lid, "B" + lid)
    pbx.at(start + 3 + talk).hangup(mobile)
    pbx.hangup(lid)


def test_a_ring_group_that_rings_a_mobile_gives_the_call_to_its_employee():
    pbx = Pbx(mobile_rules())
    ring_group_with_a_mobile(pbx, "1.0", "+79160000001")
    row = pbx.ended()["1.0"]
    assert (row["direction"], row["external_number"], row["rang"]) == ("inbound", "+79160000001", ["101", "102"])
    assert (row["answered_by"], row["ended_with"], row["billsec"]) == ("102", "102", 10)
    assert [(k, e) for k, _lid, e, _c in pbx.events if k != "ended"][:3] == [
        ("ringing", "101"), ("ringing", "102"), ("answered", "102")]


def test_the_forward_capture_goes_to_the_mobiles_owner():
    # 103 forwards to a mobile the configuration says is 102's: the mobile's owner answered
    path = os.path.join(ROOT, "tests", "fixtures", "asterisk-22.10.1-live", "forward_to_mobile")
    [row] = replay(path, rules=mobile_rules())
    assert (row["answered_by"], row["ended_with"]) == ("102", "102") and "102" in row["rang"]
    [row] = replay(path)   # without it: the employee who forwarded (AMPUSER)
    assert (row["answered_by"], row["ended_with"]) == ("103", "103")


def _from_mobile(pbx, dial_out=None):
    pbx.new("2.0", "PJSIP/trunk-00000001", "2.0", "from-trunk", "74951234567", "+7 916 222 33 44", 4)
    if dial_out is None:
        pbx.new("2.1", "PJSIP/101-00000002", "2.0")
        pbx.dial("2.0", "2.1", "PJSIP/101")
    else:   # DISA: the PBX puts the mobile through to a client
        pbx.new("2.1", "PJSIP/trunk-00000002", "2.0", "from-internal", dial_out)
        pbx.dial("2.0", "2.1", "PJSIP/%s@trunk" % dial_out)
    pbx.at(2).dialend("2.0", "2.1", "ANSWER")
    pbx.enter("2.1", "B2")
    pbx.enter("2.0", "B2")
    pbx.at(9).hangup("2.1")
    pbx.hangup("2.0")
    return [c for k, _lid, _e, c in pbx.events if k == "ended"][0]


def test_an_employee_calling_in_from_a_mobile_is_the_employee():
    rules = mobile_rules()
    call = _from_mobile(Pbx(rules))
    assert call.direction == "internal" and call.placer == "102" and call.external_number is None
    assert not bx24ast.is_reportable(call, rules)
    call = _from_mobile(Pbx(rules), dial_out="89165556677")
    row = call.as_dict(rules.number_plan)
    assert (row["direction"], row["external_number"], row["answered_by"], row["billsec"]) == \
        ("outbound", "+79165556677", "102", 7)
    rules = mobile_rules(mobile_dial_out="internal")
    call = _from_mobile(Pbx(rules), dial_out="89165556677")
    assert call.direction == "internal" and not bx24ast.is_reportable(call, rules)


@pytest.mark.parametrize("number", ["89162223345", "+79162223343", "2223344", "62223344", "+89162223344"])
def test_a_client_sharing_digits_with_a_mobile_is_a_client(number):
    rules = mobile_rules()
    pbx = Pbx(rules)
    pbx.new("3.0", "PJSIP/trunk-00000001", "3.0", "from-trunk", "74951234567", number, 4)
    pbx.new("3.1", "PJSIP/101-00000002", "3.0")
    pbx.dial("3.0", "3.1", "PJSIP/101")
    pbx.at(5).dialend("3.0", "3.1", "NOANSWER")
    pbx.hangup("3.1")
    pbx.hangup("3.0")
    row = pbx.ended()["3.0"]
    assert row["direction"] == "inbound" and row["external_number"] == rules.number_plan.normalize(number)


def test_a_desk_phone_calling_a_colleagues_mobile_is_internal():
    rules = mobile_rules()
    pbx = Pbx(rules)
    pbx.new("4.0", "PJSIP/101-00000001", "4.0", "from-internal", "89162223344", "101", 4)
    pbx.new("4.1", "PJSIP/trunk-00000002", "4.0", "from-internal", "89162223344")
    pbx.dial("4.0", "4.1", "PJSIP/89162223344@trunk")
    pbx.at(2).dialend("4.0", "4.1", "ANSWER")
    pbx.enter("4.1", "B4")
    pbx.enter("4.0", "B4")
    pbx.at(5).hangup("4.1")
    pbx.hangup("4.0")
    call = [c for k, _lid, _e, c in pbx.events if k == "ended"][0]
    assert call.direction == "internal" and not bx24ast.is_reportable(call, rules)
