"""CRM flows end to end: real captures -> call engine -> outbox -> REST client ->
the Bitrix24 emulator, checked against the emulator's state and journal."""
import collections
import logging
import os
import time

import pytest

import bx24ast
from b24_emulator import Bitrix24Emulator
from conftest import FIXTURES, load_expected, wait_for
from test_calls import Pbx, ring_group_with_a_mobile

PJSIP = os.path.join(FIXTURES, "asterisk-22.10.1-pjsip")
LOCAL = os.path.join(FIXTURES, "asterisk-22.10.1")
USERS = {"101": 5, "102": 7, "103": 9}


class Harness(object):
    """The Bitrix24 side of bx24ast (Bridge) fed by a CallTracker."""

    def __init__(self, tmp_path, emulator, settings=None, recordings=None, oauth=False):
        sections = collections.OrderedDict()
        b24 = sections["bitrix24"] = collections.OrderedDict()
        if oauth:
            b24.update(portal_url=emulator.url + "/", client_id=emulator.client_id,
                       client_secret=emulator.client_secret, oauth_url=emulator.oauth_url)
        else:
            b24["webhook_url"] = emulator.webhook_url
        # a compressed "65 s": 5xx answers may have been carried out, so they wait this long
        b24.update(rate=emulator.rate, burst=emulator.burst, timeout=2, unanswered_retry_seconds=1)
        sections["storage"] = {"state_dir": tmp_path}
        sections["recordings"] = {"path": recordings or tmp_path, "settle_seconds": 0}
        sections["crm"] = {"default_user_id": 1}
        sections["lines"] = {"74951234567": "ADVERTISING", "74957654321": "PARTNER"}
        for name, values in (settings or {}).items():
            sections.setdefault(name, {}).update(values)
        text = "".join("[%s]\n%s" % (name, "".join("%s = %s\n" % kv for kv in values.items()))
                       for name, values in sections.items())
        self.config = bx24ast.Config.from_text(text)
        self.rules = bx24ast.PbxRules.from_config(self.config)
        self.bridge = bx24ast.Bridge(self.config, self.rules)
        self.bridge.sender.BACKOFF_CAP = 0.3
        if oauth:
            self.bridge.client.save_tokens(emulator.issue_tokens())
        self.calls = []
        self.tracker = bx24ast.CallTracker(self.rules, self._on)
        self.emulator = emulator

    def _on(self, kind, call, ext):
        self.bridge.crm.on_call_event(kind, call, ext)
        if kind == "ended" and bx24ast.is_reportable(call, self.rules):
            self.calls.append(call)

    def replay(self, path):
        bx24ast.replay_capture(bx24ast.Capture(path), self.tracker)

    def __enter__(self):
        self.bridge.start()
        return self

    def __exit__(self, *exc):
        self.bridge.stop()
        self.bridge.store.close()

    def idle(self):
        counts = self.bridge.outbox.counts()
        return not counts.get("pending")

    def wait_idle(self, timeout=30):
        assert wait_for(self.idle, timeout), self.bridge.outbox.listing()


def journal_order(emulator, call_id=None, external_id=None):
    """The methods sent for one call, in order (from the emulator's journal)."""
    out = []
    for entry in emulator.journal:
        p = entry["params"] if isinstance(entry["params"], dict) else {}
        if entry.get("status") != 200:
            continue
        if external_id and p.get("EXTERNAL_CALL_ID") == external_id:
            out.append(entry["method"])
        elif call_id and p.get("CALL_ID") == call_id:
            out.append(entry["method"])
        elif call_id and entry["method"] == "tasks.task.add" and call_id in str(entry.get("call_ref")):
            out.append(entry["method"])
    return out


def check_scenario(h, emu, expected_path):
    expected = load_expected(expected_path)
    plan = bx24ast.NumberPlan()
    external = [c for c in expected["calls"] if c["direction"] != "internal"]
    mine = set(c["linkedid"] for c in expected["calls"])
    stats = dict((r["EXTERNAL_CALL_ID"], r) for r in emu.stats.values() if r["EXTERNAL_CALL_ID"] in mine)
    assert sorted(stats) == sorted(c["linkedid"] for c in external)
    for call in external:
        rec = stats[call["linkedid"]]
        row = h.bridge.records.get(call["linkedid"])
        answered = call["disposition"] == "ANSWERED"
        assert rec["PHONE_NUMBER"] == (plan.normalize(call["external_number"]) if call["external_number"]
                                       else h.config.get("crm", "withheld_number"))
        assert rec["INCOMING"] == ("2" if call["direction"] == "inbound" else "1")
        assert rec["CALL_FAILED_CODE"] == {"ANSWERED": "200", "NO ANSWER": "304", "BUSY": "486"}.get(
            call["disposition"], "603")
        if answered:
            assert abs(rec["CALL_DURATION"] - call["first_bridge_to_hangup_s"]) <= 1
            assert rec["PORTAL_USER_ID"] == USERS[call["final_extension"]]
        else:
            assert rec["CALL_DURATION"] == 0
            placer = call.get("extension") if call["direction"] == "outbound" else None
            assert rec["PORTAL_USER_ID"] == USERS[placer or call["rang_extensions"][-1]]
        assert rec["shown_at_finish"] == [], "a card was left on someone's screen"
        assert row["call_id"] == rec["CALL_ID"]
        # strict order per call
        methods = journal_order(emu, call_id=rec["CALL_ID"], external_id=call["linkedid"])
        if call.get("extension") is None or call["direction"] == "inbound":
            assert methods[0] == "telephony.externalcall.register", methods
        finish_at = methods.index("telephony.externalcall.finish")
        assert methods.count("telephony.externalcall.finish") == 1
        assert all(m in ("telephony.externalcall.register", "telephony.externalcall.show",
                         "telephony.externalcall.hide", "telephony.externalcall.searchcrmentities")
                   for m in methods[:finish_at]), methods
        if answered and call.get("recording_in_fixture", bool(call["recording_file"])):
            assert methods[finish_at + 1:] == ["telephony.externalcall.attachrecord"]
            stored = emu.records[rec["CALL_ID"]]
            with open(os.path.join(expected_path, "recordings", call["recording_file"]), "rb") as f:
                assert stored["content"] == f.read(), "recording changed on the way"
            assert stored["FILENAME"] == call["recording_file"]
        late = any(str(e["params"].get("SHOW")) == "0" for e in emu.journal
                   if e["method"] == "telephony.externalcall.register"
                   and e["params"].get("EXTERNAL_CALL_ID") == call["linkedid"])
        if call["direction"] == "inbound" and not late:
            card = rec["call"]["card_log"] if "card_log" in rec["call"] else []
            shown = set()
            for action, users in card:
                shown.update(users)
            expected_shown = {USERS[e] for e in call["rang_extensions"]}
            assert expected_shown <= shown | {rec["call"]["USER_ID"]}
    return stats


@pytest.mark.parametrize("base", [PJSIP, LOCAL], ids=["pjsip", "local"])
@pytest.mark.parametrize("scenario", ["inbound_answered", "inbound_missed", "outbound_answered",
                                      "inbound_queue", "blind_transfer", "internal_call",
                                      "concurrent_burst"])
def test_every_scenario_reaches_bitrix24(tmp_path, base, scenario):
    path = os.path.join(base, scenario)
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu, recordings=os.path.join(path, "recordings")) as h:
            h.replay(path)
            h.wait_idle()
            stats = check_scenario(h, emu, path)
            expected = load_expected(path)
            missed = [c for c in expected["calls"] if c["direction"] == "inbound"
                      and c["disposition"] != "ANSWERED"]
            assert len(emu.tasks) == len(missed)
            for call in missed:
                task = [t for t in emu.tasks.values() if call["external_number"][-7:] in t["title"]][0]
                assert task["responsibleId"] == str(USERS[call["rang_extensions"][-1]])
                lead = stats[call["linkedid"]]["CRM_ENTITY_ID"]
                assert task["ufCrmTask"] == ["L_%d" % lead]
            # a lead per unknown number, with the line's source
            for call in expected["calls"]:
                if call["direction"] == "inbound":
                    lead = emu.leads[stats[call["linkedid"]]["CRM_ENTITY_ID"]]
                    assert lead["SOURCE_ID"] == {"74951234567": "ADVERTISING", "74957654321": "PARTNER"}[call["did"]]
            assert emu.rejected_503 == 0
            assert not emu.active_calls


LIVE_22 = os.path.join(FIXTURES, "asterisk-22.10.1-live")
LIVE_16 = os.path.join(FIXTURES, "asterisk-16.30.1-live")


def _live_scenarios():
    out = []
    for base in (LIVE_22, LIVE_16):
        if os.path.isdir(base):
            out.extend(os.path.join(base, name) for name in sorted(os.listdir(base)))
    return out


@pytest.mark.parametrize("path", _live_scenarios(), ids=lambda p: "/".join(p.split(os.sep)[-2:]))
def test_every_live_scenario_reaches_bitrix24(tmp_path, path):
    """Pickups, forwards, withheld numbers, IVR, voicemail, busy, click-to-calls."""
    expected = load_expected(path)
    with Bitrix24Emulator() as emu:
        # captures made minutes ago: their missed-call tasks must not wait for the window
        with Harness(tmp_path, emu, settings={"crm": {"callback_window_minutes": 0}},
                     recordings=os.path.join(path, "recordings")) as h:
            h.replay(path)
            h.wait_idle()
            stats = check_scenario(h, emu, path)
            for call in expected["calls"]:
                rec = stats[call["linkedid"]]
                inbound_missed = call["direction"] == "inbound" and call["disposition"] != "ANSWERED"
                tasks = [t for t in emu.tasks.values() if call["linkedid"] in str(t)]
                if call["external_number"] is None:
                    # withheld: a number the portal accepts, no junk lead, the task says so
                    assert not emu.leads
                    if inbound_missed:
                        assert [t["title"] for t in emu.tasks.values()] == ["Missed call from withheld number"]
                elif inbound_missed:
                    assert len(emu.tasks) == 1
                else:
                    assert not emu.tasks, "a task for a call an employee answered"
                if call["disposition"] == "ANSWERED" and call["direction"] == "inbound":
                    # the one who answered (the picker, the forwarding employee), or who took
                    # the call last (from the parking lot), has it
                    assert rec["PORTAL_USER_ID"] == USERS[call["final_extension"]]
                if call.get("click_to_call"):
                    register = [e for e in emu.journal if e["method"] == "telephony.externalcall.register"
                                and e["params"].get("EXTERNAL_CALL_ID") == call["linkedid"]]
                    assert register and str(register[0]["params"]["TYPE"]) == "1"
            assert emu.rejected_503 == 0
            assert not emu.active_calls


def test_known_client_missed_call_goes_to_the_owner(tmp_path):
    path = os.path.join(PJSIP, "inbound_missed")
    with Bitrix24Emulator() as emu:
        contact = emu.add_contact("8 (916) 123-45-67", assigned=9)
        with Harness(tmp_path, emu) as h:
            h.replay(path)
            h.wait_idle()
            [rec] = emu.stats.values()
            assert rec["CRM_ENTITY_TYPE"] == "CONTACT" and rec["CRM_ENTITY_ID"] == contact
            assert rec["PORTAL_USER_ID"] == 9  # the owner, not the last phone that rang
            assert not emu.leads
            [task] = emu.tasks.values()
            assert task["responsibleId"] == "9" and task["ufCrmTask"] == ["C_%d" % contact]
            assert emu.activities[0]["COMPLETED"] == "N"


def test_portal_without_leads_creates_contact_and_deal(tmp_path):
    path = os.path.join(PJSIP, "inbound_missed")
    with Bitrix24Emulator(simple_crm=True) as emu:
        with Harness(tmp_path, emu, {"crm": {"mode": "contacts"}}) as h:
            h.replay(path)
            h.wait_idle()
            assert not emu.leads and len(emu.contacts) == 1 and len(emu.deals) == 1
            contact_id, deal_id = list(emu.contacts)[0], list(emu.deals)[0]
            [task] = emu.tasks.values()
            assert task["ufCrmTask"] == ["C_%d" % contact_id, "D_%d" % deal_id]
            # the auto-created entities are reassigned to the finishing user
            assert emu.contacts[contact_id]["ASSIGNED_BY_ID"] == str(USERS["102"])


def _inbound(pbx, lid, number, ext="101", answer=True, t0=0.0, talk=5.0, ring=8.0, did="74951234567"):
    uid_trunk, uid_phone = lid, lid[:-2] + ".9"
    n = int(float(lid) * 10)
    pbx.at(t0).new(uid_trunk, "PJSIP/trunk-%08x" % n, lid, "from-trunk", did, number, 4)
    pbx.new(uid_phone, "PJSIP/%s-%08x" % (ext, n + 1), lid)
    pbx.dial(uid_trunk, uid_phone, ext)
    if answer:
        pbx.at(t0 + 2).dialend(uid_trunk, uid_phone, "ANSWER")
        pbx.enter(uid_phone, "B" + lid)
        pbx.enter(uid_trunk, "B" + lid)
        pbx.at(t0 + 2 + talk)
    else:
        pbx.at(t0 + ring).dialend(uid_trunk, uid_phone, "CANCEL")
    pbx.hangup(uid_phone)
    pbx.hangup(uid_trunk)


def test_two_simultaneous_calls_from_one_number_get_two_call_ids(tmp_path):
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu) as h:
            pbx = Pbx(h.rules)
            pbx.tracker = h.tracker
            t0 = time.time() - 1000
            pbx.t = t0
            # both ring at the same moment to the same extension from the same number
            for n, (lid, ext) in enumerate((("500.1", "101"), ("600.1", "101"))):
                pbx.new(lid, "PJSIP/trunk-%08x" % n, lid, "from-trunk", "74951234567", "+79160000001", 4)
                pbx.new(lid + "9", "PJSIP/%s-%08x" % (ext, n + 10), lid)
                pbx.dial(lid, lid + "9", ext)
            for lid in ("500.1", "600.1"):
                pbx.t = t0 + 3
                pbx.hangup(lid + "9")
                pbx.hangup(lid)
            h.wait_idle()
            ids = [r["CALL_ID"] for r in emu.stats.values()]
            assert len(ids) == 2 and len(set(ids)) == 2
            registers = [e for e in emu.journal if e["method"] == "telephony.externalcall.register"]
            assert len(registers) == 2 and all(str(e["params"]["SHOW"]) == "1" for e in registers)
            assert all(not e.get("error") for e in emu.journal if e["method"] == "telephony.externalcall.finish")


def test_no_task_when_the_client_got_through_within_the_window(tmp_path):
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu, {"crm": {"callback_window_minutes": 10}}) as h:
            shift = [0.0]
            h.bridge.sender.clock = lambda: time.time() + shift[0]
            pbx = Pbx(h.rules, base=time.time())
            pbx.tracker = h.tracker
            _inbound(pbx, "700.1", "+79160000002", answer=False, t0=0, ring=1)
            _inbound(pbx, "701.1", "+79160000002", ext="102", answer=True, t0=2, talk=1)
            _inbound(pbx, "702.1", "+79160000003", answer=False, t0=6, ring=1)
            assert wait_for(lambda: len(emu.stats) == 3)
            time.sleep(0.3)
            assert not emu.tasks, "tasks wait for the call-back window"
            shift[0] = 11 * 60
            h.wait_idle(timeout=30)
            titles = [t["title"] for t in emu.tasks.values()]
            assert titles == ["Missed call from +79160000003"]
            notes = [r.last_error for r in h.bridge.outbox.requests_of("700.1") if r.kind == "task"]
            assert notes == ["the client got through since: no task"]


def test_large_recording_goes_through_the_upload_url(tmp_path):
    path = os.path.join(PJSIP, "blind_transfer")
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu, {"recordings": {"inline_max_mb": 0.1}},
                     recordings=os.path.join(path, "recordings")) as h:
            h.replay(path)
            h.wait_idle()
            [rec] = emu.stats.values()
            assert [j["method"] for j in emu.journal if j["method"] == "(upload)"] == ["(upload)"]
            with open(os.path.join(path, "recordings", os.listdir(os.path.join(path, "recordings"))[0]), "rb") as f:
                assert emu.records[rec["CALL_ID"]]["content"] == f.read()


def test_empty_or_missing_recording_still_lands_the_call(tmp_path, caplog):
    path = os.path.join(PJSIP, "inbound_answered")
    (tmp_path / "rec").mkdir()
    name = load_expected(path)["calls"][0]["recording_file"]
    (tmp_path / "rec" / name).write_bytes(open(os.path.join(path, "recordings", name), "rb").read()[:44])
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu, recordings=str(tmp_path / "rec")) as h:
            h.replay(path)
            h.wait_idle()
            assert len(emu.stats) == 1 and not emu.records
            assert "holds no audio" in caplog.text
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path / "x", emu, recordings=str(tmp_path / "nothing")) as h:
            h.replay(path)
            h.wait_idle()
            assert len(emu.stats) == 1 and not emu.records
            assert "not found" in caplog.text


@pytest.mark.parametrize("mode", ["503", "500", "html", "timeout"])
def test_outage_then_recovery_loses_nothing_and_duplicates_nothing(tmp_path, mode):
    path = os.path.join(PJSIP, "concurrent_burst")
    with Bitrix24Emulator() as emu:
        emu.set_outage(mode, 4.0)  # "ten minutes", compressed
        with Harness(tmp_path, emu, recordings=os.path.join(path, "recordings")) as h:
            h.replay(path)
            h.wait_idle(timeout=60)
            check_scenario(h, emu, path)
            assert any(e["method"] == "(outage)" for e in emu.journal)
            per_call = collections.Counter(r["EXTERNAL_CALL_ID"] for r in emu.stats.values())
            assert set(per_call.values()) == {1} and len(per_call) == 20
            assert len(emu.tasks) == 5
            assert not h.bridge.outbox.counts().get("parked")


def test_wrong_auth_type_parks_with_the_reason(tmp_path, caplog):
    path = os.path.join(PJSIP, "inbound_answered")
    with Bitrix24Emulator(refuse_webhook_telephony=True) as emu:
        with Harness(tmp_path, emu) as h:
            h.replay(path)
            assert wait_for(lambda: h.bridge.outbox.counts().get("parked", 0) >= 5), [(r, r.state, r.last_error) for r in h.bridge.outbox.requests_of("1795667003.0")]
            registers = [e for e in emu.journal if e["method"] == "telephony.externalcall.register"]
            assert len(registers) == 1, "WRONG_AUTH_TYPE must not be retried"
            assert "local application" in h.bridge.sender.alert
            parked = h.bridge.outbox.listing(("parked",))
            assert all("WRONG_AUTH_TYPE" in r.last_error for r in parked)
            # after reconfiguring, `outbox retry` sends them again, in order
            emu.refuse_webhook_telephony = False
            assert h.bridge.outbox.retry_parked() == len(parked)
            h.wait_idle()
            assert len(emu.stats) == 1


def test_oauth_token_refreshed_once_under_load(tmp_path):
    path = os.path.join(PJSIP, "concurrent_burst")
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu, oauth=True, recordings=os.path.join(path, "recordings")) as h:
            emu.expire_all_tokens()
            h.replay(path)
            h.wait_idle()
            check_scenario(h, emu, path)
            assert emu.refreshes == 1
            tokens = h.bridge.client.tokens()
            assert tokens["access_token"] in emu.tokens


def test_click_to_call_is_never_registered(tmp_path):
    with Bitrix24Emulator() as emu:
        started = emu.m_telephony_externalcall_register(
            {"USER_ID": 5, "PHONE_NUMBER": "+79161234567", "TYPE": 1, "SHOW": 1})
        call_id = started["CALL_ID"]
        with Harness(tmp_path, emu) as h:
            pbx = Pbx(h.rules)
            pbx.tracker = h.tracker
            pbx.t = time.time()
            pbx.new("10.0", "PJSIP/101-00000001", "10.0", "from-internal", "s", "101", 0)
            pbx.send("VarSet", Variable="__BX24_CALL_ID", Value=call_id, **pbx.fields("10.0"))
            pbx.dial(None, "10.0", "101")
            pbx.dialend(None, "10.0", "ANSWER")
            pbx.new("10.1", "PJSIP/trunk-00000002", "10.0", "from-trunk", "s")
            pbx.dial("10.0", "10.1", "89161234567@trunk")
            pbx.dialend("10.0", "10.1", "ANSWER")
            pbx.enter("10.1", "B1")
            pbx.enter("10.0", "B1")
            pbx.t += 12
            pbx.hangup("10.1")
            pbx.hangup("10.0")
            h.wait_idle()
            assert not [e for e in emu.journal if e["method"] == "telephony.externalcall.register"]
            assert emu.stats[call_id]["CALL_DURATION"] == 12 and emu.stats[call_id]["PORTAL_USER_ID"] == 5


def test_a_burst_of_200_calls_never_exceeds_the_limit(tmp_path):
    with Bitrix24Emulator(rate=2.0, burst=50) as emu:
        with Harness(tmp_path, emu, {"crm": {"callback_window_minutes": 0}}) as h:
            pbx = Pbx(h.rules, base=time.time() - 100)
            pbx.tracker = h.tracker
            for i in range(200):
                _inbound(pbx, "%d.1" % (3000 + i), "+7916%07d" % i, ext=("101", "102", "103")[i % 3],
                         answer=i % 4 != 0, t0=i * 0.01)
            h.wait_idle(timeout=120)
            assert emu.rejected_503 == 0
            assert len(emu.stats) == 200 and not emu.active_calls
            assert len(emu.tasks) == 50
            http_requests = [e for e in emu.journal if not e.get("in_batch")]
            assert len(http_requests) < 40, "a backlog must be sent in batches"


def test_replay_dry_run_prints_the_requests_of_each_call(tmp_path):
    import json
    import subprocess
    import sys
    from conftest import ROOT
    conf = tmp_path / "c.conf"
    conf.write_text("[users]\n101 = 5\n102 = 7\n[lines]\n74951234567 = ADVERTISING\n")
    out = subprocess.check_output([sys.executable, os.path.join(ROOT, "bx24ast.py"), "-c", str(conf),
                                   "replay", "--dry-run", os.path.join(PJSIP, "inbound_answered")],
                                  universal_newlines=True)
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0]["direction"] == "inbound"
    requests = [(r["method"], r["params"]) for r in rows[1:]]
    assert [m for m, _ in requests] == ["telephony.externalcall.register", "telephony.externalcall.show",
                                        "telephony.externalcall.hide", "telephony.externalcall.finish",
                                        "telephony.externalCall.attachRecord"]
    register = requests[0][1]
    assert register["USER_ID"] == 5 and register["TYPE"] == 2 and register["CRM_SOURCE"] == "ADVERTISING"
    assert register["EXTERNAL_CALL_ID"] == "1795667003.0" and register["PHONE_NUMBER"] == "+79161234567"
    assert register["CRM_CREATE"] == 1 and register["LINE_NUMBER"] == "74951234567"
    assert requests[1][1]["USER_ID"] == [7] and requests[2][1]["USER_ID"] == [5]
    finish = requests[3][1]
    assert finish == {"CALL_ID": "<CALL_ID from register>", "USER_ID": 7, "DURATION": 5,
                      "STATUS_CODE": "200", "ADD_TO_CHAT": 0}


def test_outbox_list_and_retry_commands(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    script = os.path.join(ROOT, "bx24ast.py")
    with Bitrix24Emulator(refuse_webhook_telephony=True) as emu:
        with Harness(tmp_path, emu) as h:
            h.replay(os.path.join(PJSIP, "inbound_answered"))
            assert wait_for(lambda: h.bridge.outbox.counts().get("parked", 0) >= 1)
            h.bridge.sender.stop()
            conf = tmp_path / "cli.conf"
            conf.write_text("[storage]\nstate_dir = %s\n" % tmp_path)
            listing = subprocess.check_output([sys.executable, script, "-c", str(conf), "outbox", "list"],
                                              universal_newlines=True)
            assert "parked" in listing and "telephony.externalcall.register" in listing
            assert "WRONG_AUTH_TYPE" in listing and emu.webhook_code not in listing
            parked = len(h.bridge.outbox.listing(("parked",)))
            out = subprocess.check_output([sys.executable, script, "-c", str(conf), "outbox", "retry"],
                                          universal_newlines=True)
            assert out.startswith("%d parked" % parked) and parked >= 1
            assert not h.bridge.outbox.listing(("parked",))


def test_recordings_in_other_formats_are_converted_or_skipped(tmp_path, caplog, monkeypatch):
    src = os.path.join(PJSIP, "inbound_answered", "recordings")
    wav = open(os.path.join(src, os.listdir(src)[0]), "rb").read()
    files = bx24ast.RecordingFiles(str(tmp_path))
    upper = tmp_path / "call.WAV"
    upper.write_bytes(wav)
    assert files.prepare(str(upper)) == ("call.wav", wav)  # PCM inside: only the name changes
    gsm = tmp_path / "call49.wav"
    gsm.write_bytes(wav[:20] + b"\x31\x00" + wav[22:])  # WAVE with GSM 6.10 format tag
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(bx24ast.RecordingProblem) as err:
        files.prepare(str(gsm))
    assert "ffmpeg, sox nor lame" in str(err.value)
    tools = tmp_path / "bin"
    tools.mkdir()
    fake = tools / "ffmpeg"
    fake.write_text("#!/bin/sh\nfor a; do out=$a; done\nprintf 'ID3' > \"$out\"\nhead -c 4000 /dev/zero >> \"$out\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tools) + os.pathsep + "/usr/bin:/bin")
    name, data = files.prepare(str(gsm))
    assert name == "call49.mp3" and data.startswith(b"ID3")


def test_a_backlog_behind_a_backing_off_request_lets_the_sender_sleep(tmp_path):
    """Only a call's first pending request can go: the requests queued behind one that
    backs off are not 'due', however old they are (the sender must not spin)."""
    store = bx24ast.StateStore.open_dir(str(tmp_path))
    outbox = bx24ast.Outbox(store)
    for n in range(3):
        outbox.add("c1", "register" if n == 0 else "finish", "telephony.externalcall.register",
                   {"n": n}, bx24ast.PRIORITY_CARD)
    head = outbox.ready(time.time())[0]
    outbox.retry(head, 120, "HTTP 503")
    due = outbox.next_due()
    assert due is not None and due > time.time() + 100
    outbox.add("c2", "register", "telephony.externalcall.register", {}, bx24ast.PRIORITY_CARD)
    assert outbox.next_due() <= time.time()
    store.close()


def test_an_outage_costs_a_few_attempts_not_a_busy_loop(tmp_path):
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu) as h:
            emu.failures["telephony.externalcall.register"] = 10 ** 6
            h.bridge.sender.BACKOFF_CAP = bx24ast.OutboxSender.BACKOFF_CAP   # the real back-off
            steps = []
            real_step = h.bridge.sender.step
            h.bridge.sender.step = lambda: steps.append(1) or real_step()
            lid = "1796000000.1"
            for n in range(20):
                h.bridge.outbox.add(lid, "register" if n == 0 else "show", "telephony.externalcall.register",
                                    {"USER_ID": 5, "PHONE_NUMBER": "+79160000000", "TYPE": 2}, bx24ast.PRIORITY_CARD)
            with h.bridge.outbox.wakeup:
                h.bridge.outbox.wakeup.notify_all()
            time.sleep(3)
            attempts = [e for e in emu.journal if e["method"] == "telephony.externalcall.register"]
            # backing off: a handful of tries and loop turns in 3 s, not thousands
            assert 1 <= len(attempts) <= 6, len(attempts)
            assert len(steps) < 60, len(steps)


def test_a_portal_that_drops_every_connection_is_probed_not_hammered(tmp_path):
    """Requests that arrive one by one during an outage share one back-off: the portal
    is away for all of them, so each step of the back-off is one attempt, not one per
    waiting request on its own clock."""
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu) as h:
            h.bridge.sender.BACKOFF_CAP = 3.0
            emu.set_outage("drop", 9.0)
            for n in range(30):
                h.bridge.outbox.add("1796000100.%d" % n, "show", "telephony.externalcall.show",
                                    {"CALL_ID": "X", "USER_ID": [5]}, bx24ast.PRIORITY_CARD)
                with h.bridge.outbox.wakeup:
                    h.bridge.outbox.wakeup.notify_all()
                time.sleep(0.25)
            time.sleep(9.5 - 30 * 0.25)
            attempts = [e for e in emu.journal if e["method"] == "(outage)"]
            # 0.5, 0.8, 1.3, 2, 3, 3... s apart: about 6 in 9 s (30+ with a clock per request)
            assert 2 <= len(attempts) <= 9, len(attempts)
            deadline = time.time() + 15
            while time.time() < deadline and h.bridge.outbox.counts().get("pending"):
                time.sleep(0.2)
            shows = [e for e in emu.journal if e["method"] == "telephony.externalcall.show"]
            assert len(shows) == 30 and not h.bridge.outbox.counts().get("pending")


# -- uncertain outcomes: a request the portal may have carried out without answering ---------

SLOW = {"bitrix24": {"timeout": 1, "unanswered_retry_seconds": 3}}


@pytest.mark.parametrize("method, before, after", [
    ("telephony.externalcall.register", 2.5, 0),     # done after the client gave up
    ("telephony.externalcall.register", 0, 1.5),     # done, the answer lost
    ("telephony.externalcall.finish", 0, 1.5),
    ("telephony.externalcall.attachrecord", 0, 1.5),
    ("tasks.task.add", 0, 1.5),
])
def test_a_slow_or_lost_answer_never_doubles_a_request(tmp_path, method, before, after):
    scenario = "inbound_missed" if method == "tasks.task.add" else "inbound_answered"
    path = os.path.join(PJSIP, scenario)
    settings = dict(SLOW, crm={"callback_window_minutes": 0})
    with Bitrix24Emulator() as emu:
        emu.slow[method] = [before, after, 1]
        with Harness(tmp_path, emu, settings, recordings=os.path.join(path, "recordings")) as h:
            h.replay(path)
            h.wait_idle(timeout=60)
            check_scenario(h, emu, path)
            registers = [e for e in emu.journal if e["method"] == "telephony.externalcall.register"]
            assert len(registers) >= 1
            # one CALL_ID: nothing registered after the finish, no card left open
            assert not emu.active_calls, emu.active_calls
            assert len(emu.stats) == 1
            call_id = list(emu.stats)[0]
            if scenario == "inbound_answered":
                assert emu.record_uploads == {call_id: 1}
            else:
                assert len(emu.tasks) == 1
            assert not h.bridge.outbox.counts().get("parked")


def test_a_request_left_without_answer_waits_out_the_portal_after_a_restart(tmp_path):
    """kill -9 while a register waits for its answer: the next life does not resend
    it while the portal may still be carrying out the first."""
    store = bx24ast.StateStore.open_dir(str(tmp_path))
    outbox = bx24ast.Outbox(store)
    outbox.add("c1", "register", "telephony.externalcall.register", {}, bx24ast.PRIORITY_CARD)
    outbox.add("c2", "show", "telephony.externalcall.show", {}, bx24ast.PRIORITY_CARD)
    sent = outbox.ready(time.time())
    outbox.mark_sending(sent, 65)
    store.close()
    store = bx24ast.StateStore.open_dir(str(tmp_path))   # the next life of the daemon
    outbox = bx24ast.Outbox(store)
    assert [r.kind for r in outbox.ready(time.time())] == ["show"]   # idempotent: resent at once
    assert [r.kind for r in outbox.ready(time.time() + 66)] == ["register", "show"]
    store.close()


def test_an_outage_is_logged_once_then_summarised(tmp_path, caplog):
    caplog.set_level(logging.INFO, "bx24ast")
    path = os.path.join(PJSIP, "concurrent_burst")
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu, recordings=os.path.join(path, "recordings")) as h:
            assert wait_for(lambda: h.bridge.users.loaded_at, 10)
            h.bridge.sender.outage.SUMMARY_EVERY = 1.0
            emu.set_outage("500", 4.0)
            h.replay(path)
            h.wait_idle(timeout=60)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    failed = sum(1 for e in emu.journal if e["method"] == "(outage)")
    assert failed >= 5
    # the first failure, then a summary a second: far fewer lines than attempts
    assert len(warnings) <= 6, warnings
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_a_register_answered_without_a_call_id_is_asked_again_not_lost(tmp_path):
    path = os.path.join(PJSIP, "inbound_answered")
    with Bitrix24Emulator() as emu:
        emu.odd_answers["telephony.externalcall.register"] = [[], 2]
        with Harness(tmp_path, emu, recordings=os.path.join(path, "recordings")) as h:
            h.replay(path)
            h.wait_idle(timeout=30)
            check_scenario(h, emu, path)
            assert not h.bridge.outbox.counts().get("parked")


def test_a_register_that_never_gets_a_call_id_parks_the_call_and_outbox_retry_saves_it(tmp_path):
    path = os.path.join(PJSIP, "inbound_answered")
    with Bitrix24Emulator() as emu:
        emu.odd_answers["telephony.externalcall.register"] = [[], 5]
        with Harness(tmp_path, emu, recordings=os.path.join(path, "recordings")) as h:
            h.replay(path)
            assert wait_for(lambda: h.bridge.outbox.counts().get("parked"), 30)
            parked = [r for r in h.bridge.outbox.listing(("parked",))]
            assert parked[0].kind == "register" and "without a CALL_ID" in parked[0].last_error
            assert h.bridge.outbox.retry_parked() == len(parked)
            h.wait_idle(timeout=30)
            check_scenario(h, emu, path)


def test_an_overload_block_pauses_everything_and_its_alert_clears_once_requests_go_again(tmp_path):
    path = os.path.join(PJSIP, "inbound_answered")
    with Bitrix24Emulator() as emu:
        emu.errors["telephony.externalcall.register"] = [503, "OVERLOAD_LIMIT", "REST API is blocked", 1]
        with Harness(tmp_path, emu, recordings=os.path.join(path, "recordings")) as h:
            sender = h.bridge.sender
            h.replay(path)
            assert wait_for(lambda: sender.alert, 10)
            assert sender.paused_until > sender.steady() + 500    # ten minutes, as support asks
            sender.paused_until = sender.steady()                 # ...compressed
            h.bridge.outbox.shift(-600)
            with h.bridge.outbox.wakeup:
                h.bridge.outbox.wakeup.notify_all()
            h.wait_idle(timeout=30)
            check_scenario(h, emu, path)
            assert sender.alert is None        # check stops warning once requests go again


def test_a_line_matches_its_lead_source_whichever_way_the_number_is_written():
    config = bx24ast.Config.from_text("[lines]\n+74951234567 = ADVERTISING\n84957654321 = PARTNER\ns = IGNORED\n")
    store = bx24ast.StateStore(":memory:")
    flows = bx24ast.CrmFlows(config, bx24ast.Outbox(store), bx24ast.CallRecords(store),
                             bx24ast.PbxRules.from_config(config))
    for did, source in (("74951234567", "ADVERTISING"), ("+74951234567", "ADVERTISING"), ("84951234567", "ADVERTISING"),
                        ("+74957654321", "PARTNER"), ("4957654321", "PARTNER"), ("74990000000", None), ("s", "IGNORED"), (None, None)):
        assert (flows.lines.get(did) or {}).get("source") == source, did
    store.close()


def _requests(emu, start=0):
    """[[methods]] of each HTTP request the portal got, a batch's commands inside."""
    out = []
    for e in emu.journal[start:]:
        if e["method"] == "user.get":
            continue   # the employee list, read by the sender when it is due
        if e.get("in_batch"):
            out[-1].append(e["method"])
        elif e["method"] == "batch":
            out.append([])
        else:
            out.append([e["method"]])
    return out


def _spend_the_budget(h, emu, level):
    """The bucket at `level` requests, once the harness is quiet; the journal's length then."""
    h.wait_idle()
    bucket = h.bridge.client.bucket
    with bucket.lock:
        bucket.level = level(bucket)
    return len(emu.journal)


def _add_now(h, linkedid, method, priority):
    h.bridge.outbox.add(linkedid, "test", method, {}, priority)
    with h.bridge.outbox.wakeup:
        h.bridge.outbox.wakeup.notify_all()


def test_the_sender_waits_for_the_budget_before_it_chooses_so_a_new_card_goes_first(tmp_path):
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu) as h:
            first = _spend_the_budget(h, emu, lambda b: b.capacity + 0.8 * b.rate)   # no room for ~0.8 s
            _add_now(h, "c1", "profile", bx24ast.PRIORITY_LATER)
            time.sleep(0.3)
            _add_now(h, "c2", "scope", bx24ast.PRIORITY_CARD)
            assert wait_for(lambda: len(emu.journal) >= first + 2, 10)
            time.sleep(0.3)
            # one request, chosen when the budget allowed it: the card first, the rest riding along
            assert _requests(emu, first) == [["scope", "profile"]], _requests(emu, first)


def test_while_the_budget_is_low_a_finish_waits_briefly_for_a_cards_request(tmp_path):
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu) as h:
            first = _spend_the_budget(h, emu, lambda b: b.capacity * 0.8)
            _add_now(h, "c1", "profile", bx24ast.PRIORITY_FINISH)
            time.sleep(0.2)
            _add_now(h, "c2", "scope", bx24ast.PRIORITY_CARD)
            assert wait_for(lambda: len(emu.journal) >= first + 2, 10)
            assert _requests(emu, first) == [["scope", "profile"]], _requests(emu, first)
            # and alone, it does not wait longer than HOLD_SECONDS
            started = time.time()
            _add_now(h, "c3", "profile", bx24ast.PRIORITY_FINISH)
            assert wait_for(lambda: len(_requests(emu, first)) == 2, 10)
            assert time.time() - started < bx24ast.OutboxSender.HOLD_SECONDS + 1.5


# -- per-line settings: who answers for the line, contact + deal, working hours ----------------------

DEAL_LINE = {"line:74951234567": {"create": "deal", "deal_category": 3, "deal_stage": "C3:NEW"}}


def test_a_deal_line_makes_a_contact_and_a_deal_in_its_pipeline(tmp_path):
    path = os.path.join(PJSIP, "inbound_answered")
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu, DEAL_LINE, recordings=os.path.join(path, "recordings")) as h:
            h.replay(path)
            h.wait_idle()
            [register] = [e for e in emu.journal if e["method"] == "telephony.externalcall.register"]
            assert str(register["params"]["CRM_CREATE"]) == "0" and not emu.leads
            [(cid, contact)] = emu.contacts.items()
            [(did, deal)] = emu.deals.items()
            assert contact["PHONE"][0]["VALUE"] == "+79161234567" and contact["SOURCE_ID"] == "ADVERTISING"
            assert (deal["CATEGORY_ID"], deal["STAGE_ID"], str(deal["CONTACT_ID"])) == ("3", "C3:NEW", str(cid))
            assert contact["ASSIGNED_BY_ID"] == deal["ASSIGNED_BY_ID"] == str(USERS["102"])   # who answered
            # the finish came after them and found the new contact by its number
            [rec] = emu.stats.values()
            assert (rec["CRM_ENTITY_TYPE"], rec["CRM_ENTITY_ID"]) == ("CONTACT", cid)
            methods = [e["method"] for e in emu.journal if e["method"] in (
                "crm.contact.add", "crm.deal.add", "telephony.externalcall.finish")]
            assert methods == ["crm.contact.add", "crm.deal.add", "telephony.externalcall.finish"]


def test_a_deal_line_missed_call_task_binds_both_and_a_known_client_gets_no_new_ones(tmp_path):
    path = os.path.join(PJSIP, "inbound_missed")
    settings = dict(DEAL_LINE, crm={"callback_window_minutes": 0})
    settings["line:74951234567"] = dict(DEAL_LINE["line:74951234567"], responsible=9)
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu, settings) as h:
            h.replay(path)
            h.wait_idle()
            [cid], [did] = list(emu.contacts), list(emu.deals)
            [task] = emu.tasks.values()
            assert task["ufCrmTask"] == ["C_%d" % cid, "D_%d" % did]
            assert task["responsibleId"] == "9"                 # the line's responsible
            assert emu.contacts[cid]["ASSIGNED_BY_ID"] == "9"
    with Bitrix24Emulator() as emu:
        known = emu.add_contact("+79161234567", assigned=5)
        with Harness(tmp_path / "again", emu, settings) as h:
            h.replay(path)
            h.wait_idle()
            assert list(emu.contacts) == [known] and not emu.deals
            notes = [r.last_error for r in h.bridge.outbox.requests_of("1795667015.3") if r.kind == "contact"]
            assert notes and "the client is in the CRM" in notes[0]


def test_a_line_responsible_takes_missed_calls_and_a_closed_line_due_after_opening(tmp_path):
    path = os.path.join(PJSIP, "inbound_missed")
    # the capture's call came on a Thursday (in any time zone a Wednesday to a Friday): the line
    # opens on Saturday
    settings = {"line:74951234567": {"responsible": 9, "hours": "sat 09:00-18:00"},
                "crm": {"callback_window_minutes": 0, "missed_task_deadline_minutes": 30}}
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu, settings) as h:
            h.replay(path)
            h.wait_idle()
            [rec] = emu.stats.values()
            assert rec["PORTAL_USER_ID"] == 9
            [task] = emu.tasks.values()
            assert task["responsibleId"] == "9"
            ended = h.bridge.records.get("1795667015.3")["ended_at"]
            hours = bx24ast.WorkingHours.parse("sat 09:00-18:00")
            assert not hours.is_open(ended)
            want = hours.next_opening(ended) + 30 * 60
            assert task["deadline"] == bx24ast.bitrix_time(want) and want > ended + 86400


def test_an_employees_mobile_on_a_ring_group_is_that_employee_in_bitrix24(tmp_path):
    with Bitrix24Emulator() as emu:
        with Harness(tmp_path, emu, {"users": {"102": "7, +79162223344"}}) as h:
            pbx = Pbx(h.rules, base=time.time() - 100)
            pbx.tracker = h.tracker
            ring_group_with_a_mobile(pbx, "5.0", "+79160000041", talk=6)
            # the employee calling in from the mobile: no lead, no card
            pbx.at(20).new("6.0", "PJSIP/trunk-00000004", "6.0", "from-trunk", "74951234567", "89162223344", 4)
            pbx.new("6.1", "PJSIP/101-00000005", "6.0")
            pbx.dial("6.0", "6.1", "PJSIP/101")
            pbx.at(22).dialend("6.0", "6.1", "ANSWER")
            pbx.hangup("6.1")
            pbx.hangup("6.0")
            h.wait_idle()
            [rec] = emu.stats.values()
            assert rec["EXTERNAL_CALL_ID"] == "5.0" and rec["PORTAL_USER_ID"] == 7 and rec["CALL_DURATION"] == 6
            shown = set()
            for _action, users in rec["call"]["card_log"]:
                shown.update(users)
            assert shown >= {5, 7} and rec["shown_at_finish"] == []
            assert all(e["params"].get("PHONE_NUMBER") != "+79162223344" for e in emu.journal)
