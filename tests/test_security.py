"""Every listener under abuse, one test per finding of the security review (V1-V9 and
the small ones): each of these failed on the code before the fixes."""
import errno
import http.client
import logging
import os
import re
import select
import socket
import stat
import threading
import time

import pytest

import bx24ast
from conftest import wait_for
from test_wizard import Browser, step, wizard_env  # noqa: F401 (wizard_env is a fixture)


class NoClicks(object):
    def handle_event(self, *args):
        return False, "not in this test"


def _connect(port, source):
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")   # and then a header line now and then, or nothing
    return sock


def _closed_by_server(sock, wait=0.3):
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except OSError as exc:
        return exc.errno in (errno.ECONNRESET, errno.EPIPE)


def _post(port, body, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/", body, dict({"Content-Type": "application/x-www-form-urlencoded"}, **(headers or {})))
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


@pytest.fixture
def events():
    listener = bx24ast.EventListener(NoClicks(), "tok", "127.0.0.1", 0)
    listener.server.request_deadline = 4.0
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()


# -- V1: idle connections cannot use up the daemon -----------------------------------------------

def test_v1_idle_connections_are_capped_per_address_and_in_total_and_cut_at_the_deadline(events):
    port = events.address[1]
    server = events.server
    threads_before = threading.active_count()
    socks = []
    try:
        one = [_connect(port, "127.0.0.2") for _ in range(server.max_per_address + 4)]
        socks += one
        assert wait_for(lambda: server.open_count() == server.max_per_address, 5)
        time.sleep(0.5)
        readable = select.select(one, [], [], 0)[0]
        refused = [s for s in readable if _closed_by_server(s, 0.1)]
        assert len(refused) == 4, "one address may hold %d connections" % server.max_per_address
        # many addresses: the total is capped too
        for n in range(3, 10):
            socks += [_connect(port, "127.0.0.%d" % n) for _ in range(server.max_per_address)]
        assert server.open_count() <= server.max_connections
        assert threading.active_count() - threads_before <= server.max_connections + 2
        # the listener is not hung: once the trickling clients are cut off, a real request is answered
        assert wait_for(lambda: server.open_count() == 0, 10), "connections past the deadline are cut"
        assert all(_closed_by_server(s, 2) for s in socks[:5])
        resp, _ = _post(port, "event=ONEXTERNALCALLSTART&auth%5Bapplication_token%5D=wrong")
        assert resp.status == 403
    finally:
        for s in socks:
            s.close()


def test_v1_the_unit_raises_the_file_limit():
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "install.sh")) as f:
        assert "LimitNOFILE=4096" in f.read()


# -- V2: the login lockout holds against parallel guesses ---------------------------------------

def test_v2_parallel_wrong_passwords_are_counted_before_they_are_checked(wizard_env):
    port = wizard_env["server"].address[1]
    browsers = []
    for _ in range(30):
        b = Browser(port)
        b.get("/config/master/login")
        browsers.append(b)
    start = threading.Barrier(len(browsers))
    statuses = []

    def guess(b, n):
        start.wait()
        statuses.append(b.post("/config/master/login", {"user": "admin", "password": "wrong guess %d!" % n})[0])

    threads = [threading.Thread(target=guess, args=(b, n)) for n, b in enumerate(browsers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    checked = statuses.count(200)     # "wrong login or password": the password was looked at
    assert checked <= bx24ast.WizardServer.FAILS_PER_MINUTE, statuses
    assert statuses.count(429) == len(browsers) - checked


# -- V3: rewriting manager.conf keeps its mode ---------------------------------------------------

def test_v3_creating_the_ami_user_keeps_manager_conf_private(wizard_env):
    manager = wizard_env["root"] / "etc" / "asterisk" / "manager.conf"
    os.chmod(str(manager), 0o640)
    before = os.stat(str(manager))
    b = wizard_env["browser"]
    b.login()
    status, text, _ = step(b, "ami", {}, action="create_ami_user")
    assert status == 200 and "user bx24 written to" in text
    after = os.stat(str(manager))
    assert stat.S_IMODE(after.st_mode) == 0o640 and (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert "[bx24]" in manager.read_text() and "[admin]" in manager.read_text()
    # a PBX without the file: a new one is not world-readable either
    manager.unlink()
    assert step(b, "ami", {}, action="create_ami_user")[0] == 200
    assert stat.S_IMODE(os.stat(str(manager)).st_mode) == 0o640


# -- V4: the webhook's secret code never goes back to the browser ---------------------------------

WEBHOOK = "https://b24-test.bitrix24.ru/rest/1/s3cr3tc0de4567xy/"


def test_v4_the_webhook_is_shown_masked_and_blank_keeps_it(wizard_env):
    bx24ast.update_config_file(wizard_env["conf"], {("bitrix24", "webhook_url"): WEBHOOK})
    b = wizard_env["browser"]
    b.login()
    status, text, _ = b.get("/config/master/bitrix24")
    assert status == 200 and "s3cr3tc0de4567xy" not in text and "/rest/1/***/" in text
    # a failed step does not echo a newly typed one either
    other = "https://b24-test.bitrix24.ru/rest/1/an0th3rc0de/"
    status, text, _ = step(b, "bitrix24", {"bitrix24.webhook_url": other, "bitrix24.portal_url": "not a url"})
    assert "an0th3rc0de" not in text
    # blank keeps the one set; the save page masks it
    status, _, _ = step(b, "bitrix24", {"bitrix24.webhook_url": ""})
    assert status == 303
    step(b, "bitrix24", {"bitrix24.webhook_url": other})
    status, text, _ = b.get("/config/master/save")
    assert "an0th3rc0de" not in text and "s3cr3tc0de4567xy" not in text and "/rest/1/***/" in text


# -- V5: no value can split into a second INI line ----------------------------------------------

@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x1c", "\x0b", "\x0c"])
def test_v5_a_line_separator_in_a_field_is_refused_and_the_file_stays_whole(wizard_env, separator):
    b = wizard_env["browser"]
    b.login()
    status, text, _ = step(b, "database", {"cel.backend": "mysql",
                                           "cel.mysql_user": "reader%ssqlite_path = /etc/shadow" % separator})
    assert status == 400 and "a single line" in text
    with pytest.raises(bx24ast.ConfigError) as err:
        bx24ast.update_config_file(wizard_env["conf"], {("cel", "mysql_user"): "a%sb = c" % separator})
    assert "[cel] mysql_user" in str(err.value)
    # a value someone wrote by hand with such a character is kept whole by the next save
    by_hand = str(wizard_env["tmp"] / "by-hand.conf")
    with open(by_hand, "w", encoding="utf-8") as f:
        f.write("[ami]\n; the PBX%ssecret = is elsewhere\nport = 5038\n" % separator)
    bx24ast.update_config_file(by_hand, {("ami", "port"): "5039"})
    with open(by_hand, encoding="utf-8") as f:
        assert f.read() == "[ami]\n; the PBX%ssecret = is elsewhere\nport = 5039\n" % separator
    assert bx24ast.Config.load(by_hand).get("ami", "port") == 5039


# -- V6: a logged-in admin's form cannot take the daemon down ---------------------------------------

def test_v6_line_count_is_bounded_and_checked(wizard_env):
    b = wizard_env["browser"]
    b.login()
    started = time.time()
    status, text, _ = step(b, "crm", {"line_count": "3000000"})
    assert status == 400 and "line_count" in text and len(text) < 200000
    assert time.time() - started < 10
    status, text, _ = step(b, "crm", {"line_count": "abc"})
    assert status == 400 and "a whole number" in text
    # each failed save does not add three more empty rows
    fields = {"line_count": "4", "line_did_0": "bad did!", "line_source_0": "CALL"}
    counts = []
    for _ in range(3):
        status, text, _ = step(b, "crm", fields)
        counts.append(int(re.search(r"name=line_count value=(\d+)", text).group(1)))
        fields = {"line_count": str(counts[-1]), "line_did_0": "bad did!", "line_source_0": "CALL"}
    assert counts[0] == counts[1] == counts[2] == 4


def test_v6_a_named_pipe_as_a_path_is_refused_not_read(tmp_path):
    fifo = str(tmp_path / "cel.fifo")
    os.mkfifo(fifo)
    result = []
    reader = threading.Thread(target=lambda: result.append(bx24ast.cel_health(bx24ast.SqliteCel(fifo))),
                              daemon=True)
    reader.start()
    reader.join(10)
    assert result, "reading a FIFO hung"
    assert "not a regular file" in str(result[0])
    with pytest.raises(bx24ast.ConfigError) as err:
        bx24ast.tls_context(fifo, "", "wizard")
    assert "tls_cert" in str(err.value) and "regular file" in str(err.value)


# -- V7: form values of the wrong shape -----------------------------------------------------------

@pytest.mark.parametrize("body, field", [
    ("event=ONEXTERNALCALLSTART&auth%5Bapplication_token%5D%5Ba%5D=1", "auth[application_token]"),
    ("event%5Bx%5D=1&auth%5Bapplication_token%5D=tok", "event"),
])
def test_v7_a_nested_value_where_a_single_one_is_expected_gets_a_clear_400(events, body, field):
    resp, data = _post(events.address[1], body)
    assert resp.status == 400 and field.encode() in data


# -- V8: only ASCII digits are numbers -------------------------------------------------------------

def test_v8_full_width_digits_are_not_a_user_id_nor_a_number():
    assert not bx24ast.is_digits("\uff11") and not bx24ast.is_digits("\u0663") and bx24ast.is_digits("17")
    with pytest.raises(ValueError):
        bx24ast._as_int(0, 100)("\uff11")
    rules = bx24ast.PbxRules.from_config(bx24ast.Config.from_text(""))
    assert rules.number_plan.normalize("\uff18\uff19\uff11\uff16\uff11\uff12\uff13\uff14\uff15\uff16\uff17") is None


def test_v8_a_click_to_call_with_a_full_width_user_id_is_refused(tmp_path):
    store = bx24ast.StateStore(str(tmp_path / "s.db"))
    click = bx24ast.ClickToCall(None, None, store, None, None, {"user_interval_seconds": 3})
    refused = []
    click._refuse = lambda call_id, user, number, why, close=False: refused.append(why) or (False, why)
    ok, why = click.start({"CALL_ID": "externalCall.1", "USER_ID": "\uff11", "PHONE_NUMBER": "+79161234567"},
                          "test")
    assert not ok and "data[USER_ID]" in why
    store.close()


# -- V9: refusals and vanished clients do not flood the log ----------------------------------------

def test_v9_a_flood_of_refused_posts_is_summarised(events, caplog):
    bx24ast.REFUSALS._windows.clear()
    with caplog.at_level(logging.INFO, logger="bx24ast"):
        for _ in range(100):
            _post(events.address[1], "event=ONEXTERNALCALLSTART&auth%5Bapplication_token%5D=wrong")
    lines = [r for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(lines) <= bx24ast.REFUSALS.burst + 1, len(lines)


def test_v9_a_client_gone_mid_reply_is_one_quiet_line_not_a_traceback(wizard_env, caplog):
    server = wizard_env["server"]

    class Gone(object):
        def write(self, data):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    class Request(object):
        path = "/config/master/login"
        client_address = ("127.0.0.1", 1)
        headers = {}
        wfile = Gone()

        def send_response(self, *a):
            pass

        def send_header(self, *a):
            pass

        def end_headers(self):
            pass

    with caplog.at_level(logging.DEBUG, logger="bx24ast"):
        server.serve(Request(), "GET")
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


def test_v9_the_limiter_tells_how_many_it_held_back():
    now = [0.0]
    limiter = bx24ast.LogLimiter(burst=2, every=60, clock=lambda: now[0])
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    bx24ast.log.addHandler(handler)
    try:
        for _ in range(10):
            limiter.log(logging.WARNING, "k", "refused %s", "x")
        now[0] = 61
        limiter.log(logging.WARNING, "k", "refused %s", "y")
    finally:
        bx24ast.log.removeHandler(handler)
    assert seen == ["refused x", "refused x", "k: 8 more like it in the last minute, not logged one by one",
                    "refused y"]


# -- and the small ones ------------------------------------------------------------------------------

def test_the_state_database_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        store = bx24ast.StateStore.open_dir(str(tmp_path / "state"))
        store.set_setting("k", "v")
    finally:
        os.umask(old)
    for name in os.listdir(str(tmp_path / "state")):
        path = str(tmp_path / "state" / name)
        if name.startswith("bx24ast.db"):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, name
    store.close()
    # an older database left 0644 is made private on open
    db = str(tmp_path / "state" / "bx24ast.db")
    os.chmod(db, 0o644)
    bx24ast.StateStore.open_dir(str(tmp_path / "state")).close()
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600


def test_headers_name_no_python_and_keep_browsers_from_guessing(wizard_env, events):
    for port, path in ((wizard_env["server"].address[1], "/config/master/login"), (events.address[1], "/")):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.getheader("Server") == "bx24ast"
        assert resp.getheader("X-Content-Type-Options") == "nosniff"
        assert resp.getheader("Referrer-Policy") == "no-referrer"


def test_a_wizard_session_left_idle_has_to_log_in_again(wizard_env):
    b = wizard_env["browser"]
    b.login()
    assert b.get("/config/master/ami")[0] == 200
    token = b.cookies["bx24ast_session"]
    bx24ast.WizardServer.sessions[token]["seen"] -= bx24ast.WizardServer.IDLE_SECONDS + 1
    status, _, where = b.get("/config/master/ami")
    assert status == 303 and where.endswith("/login")


def test_error_pages_are_styled_and_in_the_admins_language(wizard_env):
    b = wizard_env["browser"]
    b.login()
    step(b, "language", {"wizard.language": "ru"})
    conn = http.client.HTTPConnection("127.0.0.1", wizard_env["server"].address[1], timeout=10)
    conn.request("GET", "/config/master/nothing-here",
                 headers={"Cookie": "; ".join("%s=%s" % kv for kv in b.cookies.items())})
    resp = conn.getresponse()
    text = resp.read().decode("utf-8")
    conn.close()
    assert resp.status == 404 and "<style>" in text and "Такой страницы в настройке нет." in text


def test_global_options_work_after_the_command_too(tmp_path, capsys):
    conf = str(tmp_path / "b.conf")
    with open(conf, "w") as f:
        f.write(bx24ast.example_config_text())
    assert bx24ast.main(["check-config", "-c", conf]) == 0
    assert bx24ast.main(["-c", conf, "check-config"]) == 0
    assert bx24ast.main(["check-config", "--config", str(tmp_path / "missing.conf")]) != 0
    assert "missing.conf" in capsys.readouterr().err
    args = bx24ast.build_arg_parser().parse_args(["--log-level", "debug", "run", "-f", "-c", conf])
    assert args.config == conf and args.log_level == "debug" and args.foreground
    args = bx24ast.build_arg_parser().parse_args(["-c", conf, "run"])
    assert args.config == conf
