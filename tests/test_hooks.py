"""Hooks: an admin's hooks.py called at fixed points, and never able to lose a call."""
import http.server
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

import bx24ast
from b24_emulator import Bitrix24Emulator
from conftest import FIXTURES, ROOT, wait_for
from test_calls import Pbx
from test_crm import USERS, Harness, _inbound
from test_routing import StubAmi, click_settings

PJSIP = os.path.join(FIXTURES, "asterisk-22.10.1-pjsip")
SCRIPT = os.path.join(ROOT, "bx24ast.py")

EVERY_HOOK = r'''
import json, os

BLOCKED = {"+79990000001"}

def need_registration(call):
    # a robocaller, and a service line nobody wants in the CRM
    return call["number"] not in BLOCKED and call["did"] != "74950000000"

def process_client_phone(number, call):
    # the trunk hands a forwarded number for a client who asked to be called elsewhere
    return "+79160000004" if number == "+79160000003" else number

def process_user_phone(extension, call):
    return "103" if extension == "104" else extension     # a soft phone of Oleg's

def process_registration_params(params, call):
    if call["did"] == "74957654321":
        params["CRM_CREATE"] = 0                           # the support line creates no leads
    params["EXTERNAL_CALL_ID"] = "changed"                 # not a hook's to change: ignored

def customize_show_call_card(params, call):
    users = [u for u in params["USER_ID"] if u != 7]      # Maria never gets cards
    if not users:
        return False
    return dict(params, USER_ID=users)

def process_final_params(params, call):
    if params["DURATION"] > 0:
        params["VOTE"] = 5
    return params

def process_task_creation_params(fields, call):
    if call["number"] == "+79160000009":
        return False                                       # a client the boss calls back himself
    fields["TITLE"] = "Перезвонить " + call["number"]
    fields["PRIORITY"] = 2
    return fields

def customize_missed_call_responsible(user_id, call):
    return 9 if call["did"] == "74957654321" else user_id

def process_record_file_path(path, call):
    base = os.environ.get("RECORDINGS_URL")
    return base + os.path.basename(path) if base and path else path

def process_originate_params(params, click):
    if not click["number"].startswith("+7"):
        params["Context"] = "trunk-international"
    return params

def customize_autodistribution(result, caller):
    if caller["line"] == "74957654321" and not result["extension"]:
        result.update(extension="103", status="FOUND")
    return result

def post_registration(result, call):
    if result.get("CRM_ENTITY_TYPE") == "LEAD":
        return [["crm.timeline.comment.add", {"fields": {
            "ENTITY_TYPE": "lead", "ENTITY_ID": result["CRM_ENTITY_ID"],
            "COMMENT": "Called line %s" % call["did"]}}]]

def post_finish(result, call):
    if result.get("CRM_ENTITY_ID"):
        return [["crm.timeline.comment.add", {"fields": {
            "ENTITY_TYPE": result["CRM_ENTITY_TYPE"].lower(), "ENTITY_ID": result["CRM_ENTITY_ID"],
            "COMMENT": "Talked %d s" % result["CALL_DURATION"]}}]]
'''


def hooks_file(tmp_path, text, name="hooks.py"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def harness(tmp_path, emu, text, timeout_ms=300, **kw):
    settings = kw.pop("settings", {})
    settings.setdefault("hooks", {}).update(file=hooks_file(tmp_path, text), timeout_ms=timeout_ms)
    return Harness(tmp_path, emu, settings=settings, **kw)


def registers(emu):
    return [e for e in emu.journal if e["method"] == "telephony.externalcall.register" and e.get("status") == 200]


def office(h):
    pbx = Pbx(h.rules, base=time.time() - 1000)
    pbx.tracker = h.tracker
    return pbx


# -- each hook point, through the emulator ---------------------------------------------------------

def test_need_registration_leaves_out_blocked_numbers_and_lines(tmp_path):
    with Bitrix24Emulator() as emu:
        with harness(tmp_path, emu, EVERY_HOOK, settings={"crm": {"callback_window_minutes": 0}}) as h:
            pbx = office(h)
            _inbound(pbx, "900.1", "+79990000001")                          # blocked number
            _inbound(pbx, "901.1", "+79160000001", did="74950000000")       # ignored line
            _inbound(pbx, "902.1", "+79160000002", t0=10)
            h.wait_idle()
            assert [e["params"]["PHONE_NUMBER"] for e in registers(emu)] == ["+79160000002"]
            assert [r["EXTERNAL_CALL_ID"] for r in emu.stats.values()] == ["902.1"]


def test_client_phone_user_phone_and_register_params(tmp_path):
    with Bitrix24Emulator() as emu:
        with harness(tmp_path, emu, EVERY_HOOK) as h:
            pbx = office(h)
            _inbound(pbx, "910.1", "+79160000003", ext="104")
            _inbound(pbx, "911.1", "+79160000005", did="74957654321", t0=10)
            h.wait_idle()
            first, second = registers(emu)
            assert first["params"]["PHONE_NUMBER"] == "+79160000004"     # process_client_phone
            assert str(first["params"]["USER_ID"]) == "9"                 # 104 is Oleg's soft phone
            assert first["params"]["EXTERNAL_CALL_ID"] == "910.1"         # protected from the hook
            assert str(second["params"]["CRM_CREATE"]) == "0"             # the support line
            assert len(emu.leads) == 1
            assert h.bridge.records.get("910.1")["external_number"] == "+79160000004"


def test_show_card_final_params_task_and_missed_responsible(tmp_path):
    with Bitrix24Emulator() as emu:
        with harness(tmp_path, emu, EVERY_HOOK, settings={"crm": {"callback_window_minutes": 0}}) as h:
            pbx = office(h)
            _inbound(pbx, "920.1", "+79160000006", ext="102")                       # answered by Maria
            _inbound(pbx, "921.1", "+79160000007", did="74957654321", answer=False, t0=10)
            _inbound(pbx, "922.1", "+79160000009", answer=False, t0=20)
            _inbound(pbx, "923.1", "+79160000008", answer=True, t0=30)
            h.wait_idle()
            by_ext = dict((r["EXTERNAL_CALL_ID"], r) for r in emu.stats.values())
            # Maria's card: registered without a popup for her, never shown later either
            shows = [e for e in emu.journal if e["method"] == "telephony.externalcall.show"]
            assert all(7 not in (e["params"]["USER_ID"] if isinstance(e["params"]["USER_ID"], list)
                                 else [e["params"]["USER_ID"]]) for e in shows)
            assert by_ext["920.1"]["CALL_VOTE"] == 5 and by_ext["923.1"]["CALL_VOTE"] == 5
            assert "CALL_VOTE" not in by_ext["921.1"]
            # the support line's missed call goes to Oleg, with its task
            assert by_ext["921.1"]["PORTAL_USER_ID"] == 9
            [task] = emu.tasks.values()      # none for +79160000009: the hook said no
            assert task["title"] == "Перезвонить +79160000007" and task["responsibleId"] == "9"
            done = [r for r in h.bridge.outbox.requests_of("922.1") if r.kind == "task"]
            assert done[0].state == "done" and "process_task_creation_params" in done[0].last_error


def test_post_registration_and_post_finish_queue_requests(tmp_path):
    with Bitrix24Emulator() as emu:
        with harness(tmp_path, emu, EVERY_HOOK) as h:
            pbx = office(h)
            _inbound(pbx, "930.1", "+79160000010")
            h.wait_idle()
            lead = registers(emu)[0]
            [record] = emu.stats.values()
            comments = [c["COMMENT"] for c in emu.comments.values()]
            assert comments == ["Called line 74951234567", "Talked %d s" % record["CALL_DURATION"]]
            assert all(str(c["ENTITY_ID"]) == str(record["CRM_ENTITY_ID"]) for c in emu.comments.values())
            assert lead
            kinds = [r.kind for r in h.bridge.outbox.requests_of("930.1")]
            assert kinds.count("hook") == 2


class OneFile(http.server.BaseHTTPRequestHandler):
    content = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.content)))
        self.end_headers()
        self.wfile.write(self.content)

    def log_message(self, *args):
        pass


def test_record_file_path_can_hand_the_portal_a_url(tmp_path, monkeypatch):
    path = os.path.join(PJSIP, "inbound_answered")
    [name] = os.listdir(os.path.join(path, "recordings"))
    with open(os.path.join(path, "recordings", name), "rb") as f:
        OneFile.content = f.read()
    server = http.server.HTTPServer(("127.0.0.1", 0), OneFile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("RECORDINGS_URL", "http://127.0.0.1:%d/monitor/" % server.server_address[1])
    try:
        with Bitrix24Emulator() as emu:
            with harness(tmp_path, emu, EVERY_HOOK, recordings=os.path.join(path, "recordings")) as h:
                h.replay(path)
                h.wait_idle()
                [call_id] = emu.records
                assert emu.record_urls[call_id].endswith("/monitor/" + name)
                assert emu.records[call_id]["content"] == OneFile.content
                assert not emu.uploads        # nothing uploaded by bx24ast itself
    finally:
        server.shutdown()
        server.server_close()


def test_originate_params_and_autodistribution(tmp_path):
    hooks = bx24ast.Hooks(hooks_file(tmp_path, EVERY_HOOK))
    store = bx24ast.StateStore(str(tmp_path / "state.db"))
    ami = StubAmi()
    click = bx24ast.ClickToCall(ami, bx24ast.UserDirectory(overrides={"101": 5}), store, bx24ast.Outbox(store),
                                bx24ast.PbxRules.defaults(), click_settings(user_interval_seconds=0), hooks=hooks)
    assert click.start({"CALL_ID": "c.1", "USER_ID": "5", "PHONE_NUMBER": "+44 20 7946 0958"}, "test")[0]
    assert click.start({"CALL_ID": "c.2", "USER_ID": "5", "PHONE_NUMBER": "+7 916 123-45-67"}, "test")[0]
    assert [o["context"] for o in ami.originates] == ["trunk-international", "from-internal"]
    assert ami.originates[0]["exten"] == "00442079460958"
    store.close()
    with Bitrix24Emulator() as emu:
        client = bx24ast.BitrixClient(webhook_url=emu.webhook_url, timeout=10, rate=emu.rate, burst=emu.burst)
        users = bx24ast.UserDirectory(client)
        users.refresh()
        lookup = bx24ast.ResponsibleLookup(client, users, bx24ast.PbxRules.defaults(), hooks=hooks)
        assert lookup.lookup("89160000011", "74957654321")["extension"] == "103"
        assert lookup.lookup("89160000011", "74951234567")["extension"] == ""
        emu.add_contact("+79160000012", assigned=5)
        assert lookup.lookup("89160000012", "74957654321")["extension"] == "101"   # the CRM's owner wins


# -- hooks that fail never lose a call -------------------------------------------------------------

BROKEN = r'''
import time

def need_registration(call):
    raise RuntimeError("the blacklist server is down")

def process_client_phone(number, call):
    time.sleep(5)
    return number

def process_user_phone(extension, call):
    return 101                       # not text

def process_registration_params(params, call):
    return ["not", "a", "dict"]

def customize_show_call_card(params, call):
    params["USER_ID"] = {1, 2}       # not JSON
    return params

def process_final_params(params, call):
    del params["STATUS_CODE"]
    raise ValueError("half an edit, then a failure")

def process_task_creation_params(fields, call):
    import sys
    sys.exit(1)

def customize_missed_call_responsible(user_id, call):
    return "nobody"

def post_registration(result, call):
    return [["crm.lead.update"]]

def post_finish(result, call):
    return "crm.timeline.comment.add"

def process_record_file_path(path, call):
    return "/etc/passwd\nx"
'''


def test_a_hook_that_raises_sleeps_or_returns_garbage_is_taken_as_absent(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bx24ast")
    path = os.path.join(PJSIP, "inbound_missed")
    with Bitrix24Emulator() as emu:
        with harness(tmp_path, emu, BROKEN, timeout_ms=100, settings={"crm": {"callback_window_minutes": 0}},
                     recordings=os.path.join(path, "recordings")) as h:
            h.replay(path)
            pbx = office(h)
            _inbound(pbx, "940.1", "+79160000020", answer=True, t0=50)
            _inbound(pbx, "941.1", "+79160000021", answer=False, t0=60)
            h.wait_idle()
            # every call reported as if there were no hooks file at all
            stats = dict((r["EXTERNAL_CALL_ID"], r) for r in emu.stats.values())
            assert sorted(stats) == sorted(["940.1", "941.1"] + [lid for lid in stats if lid not in ("940.1", "941.1")])
            assert len(stats) == 3
            assert stats["940.1"]["PORTAL_USER_ID"] == USERS["101"] and stats["940.1"]["CALL_FAILED_CODE"] == "200"
            assert stats["941.1"]["CALL_FAILED_CODE"] == "304" and stats["941.1"]["PHONE_NUMBER"] == "+79160000021"
            assert len(emu.tasks) == 2 and all(t["title"].startswith("Missed call from") for t in emu.tasks.values())
            assert not emu.comments
            assert emu.rejected_503 == 0
            errors = h.bridge.hooks.errors
            for name in ("need_registration", "process_client_phone", "process_user_phone",
                         "process_registration_params", "customize_show_call_card", "process_final_params",
                         "process_task_creation_params", "customize_missed_call_responsible", "post_registration",
                         "post_finish"):
                assert errors[name] >= 1, name
            assert errors["need_registration"] == 3 and errors["process_final_params"] == 3
    # each failure said once, by name, however many calls met it
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hooks: ")]
    for name, what in (("need_registration", "raised RuntimeError"), ("process_client_phone", "ran longer"),
                       ("process_user_phone", "cannot use"), ("process_final_params", "raised ValueError"),
                       ("process_task_creation_params", "raised SystemExit")):
        said = [line for line in lines if line.startswith("hooks: %s " % name) and what in line]
        assert len(said) == 1, (name, lines)


def test_a_hooks_file_that_does_not_load_runs_without_hooks(tmp_path, caplog):
    hooks = bx24ast.Hooks(hooks_file(tmp_path, "def need_registration(call):\n    return (\n"))
    assert hooks.load_error and "SyntaxError" in hooks.load_error and not hooks.functions
    hooks = bx24ast.Hooks(str(tmp_path / "missing.py"))
    assert "FileNotFoundError" in hooks.load_error
    caplog.set_level(logging.WARNING, logger="bx24ast")
    hooks = bx24ast.Hooks(hooks_file(tmp_path, "def need_registraton(call):\n    return False\n"))
    assert not hooks.functions
    assert any("need_registraton, which bx24ast never calls" in r.getMessage() for r in caplog.records)
    with Bitrix24Emulator() as emu:
        with harness(tmp_path, emu, "import no_such_module\n") as h:
            assert "ModuleNotFoundError" in h.bridge.hooks.load_error or "ImportError" in h.bridge.hooks.load_error
            h.replay(os.path.join(PJSIP, "inbound_answered"))
            h.wait_idle()
            assert len(emu.stats) == 1


# -- bx24ast.py hooks test, and the shipped example --------------------------------------------------

def run_cli(*args):
    proc = subprocess.run([sys.executable, SCRIPT] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def test_hooks_test_prints_what_each_hook_changed(tmp_path):
    conf = tmp_path / "bx24ast.conf"
    conf.write_text("[users]\n101 = 5\n102 = 7\n103 = 9\n[crm]\ndefault_user_id = 1\n")
    path = hooks_file(tmp_path, EVERY_HOOK + "\ndef process_user_phone(extension, call):\n"
                                            "    return {'101': '103'}.get(extension, extension)\n")
    code, out, err = run_cli("-c", str(conf), "hooks", "test", os.path.join(PJSIP, "inbound_missed"), "--hooks", path)
    assert code == 0, err
    assert "call 1795667015.3: inbound +79161234567 to 74951234567" in out
    assert 'process_user_phone: "101" -> "103"' in out
    assert 'process_task_creation_params: TITLE "Missed call from +79161234567" -> "Перезвонить +79161234567"' in out
    assert "PRIORITY = 2 added" in out
    assert 'post_registration: [] -> [["crm.timeline.comment.add"' not in out    # no lead in a dry run
    code, out, err = run_cli("-c", str(conf), "hooks", "test", os.path.join(PJSIP, "inbound_missed"),
                             "--hooks", hooks_file(tmp_path, BROKEN, "broken.py"))
    assert code == 1 and "hook need_registration failed 1 time(s)" in out
    assert "need_registration raised RuntimeError" in err
    code, _out, err = run_cli("-c", str(conf), "hooks", "test", os.path.join(PJSIP, "inbound_missed"))
    assert code == 2 and "[hooks] file is empty" in err


def test_the_shipped_example_has_every_hook_and_runs(tmp_path):
    example = os.path.join(ROOT, "hooks.example.py")
    hooks = bx24ast.Hooks(example)
    assert hooks.load_error is None
    assert sorted(hooks.functions) == sorted(bx24ast.HOOK_POINTS)
    for path in (os.path.join(PJSIP, "inbound_queue"), os.path.join(PJSIP, "outbound_answered")):
        code, out, err = run_cli("hooks", "test", path, "--hooks", example)
        assert code == 0, err
        assert out.startswith("call ")


def test_a_hook_stuck_for_good_keeps_one_thread_not_one_per_call(tmp_path):
    import threading as _threading
    hooks = bx24ast.Hooks(hooks_file(tmp_path, "import time\ndef process_client_phone(number, call):\n"
                                               "    time.sleep(3)\n    return number\n"), timeout=0.05)
    before = _threading.active_count()
    started = time.time()
    for _ in range(20):
        assert hooks.client_phone("+79160000001", {}) == "+79160000001"
    assert time.time() - started < 1.5          # one wait, then the hook is skipped while it is stuck
    assert _threading.active_count() - before <= 1 and hooks.errors["process_client_phone"] == 20
    hooks = bx24ast.Hooks(hooks_file(tmp_path, "import sys\nsys.exit(3)\n", "exits.py"))
    assert hooks.load_error.startswith("SystemExit")


def test_a_value_handed_back_as_given_is_never_an_error(tmp_path):
    """`hooks test` on a capture named by a relative path: the recording's path is
    relative, and a hook returning it untouched must not count as a broken hook."""
    hooks = bx24ast.Hooks(hooks_file(tmp_path, "def process_record_file_path(path, call):\n"
                                               "    return path if call['n'] == 1 else 'elsewhere/y.wav'\n"))
    check = bx24ast.OutboxSender.a_recording
    assert hooks.call("process_record_file_path", "rec/x.wav", ("rec/x.wav", {"n": 1}), check) == "rec/x.wav"
    assert not hooks.errors
    assert hooks.call("process_record_file_path", "rec/x.wav", ("rec/x.wav", {"n": 2}), check) == "rec/x.wav"
    assert hooks.errors["process_record_file_path"] == 1
