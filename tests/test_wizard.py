"""The setup wizard, driven through http.client like a browser."""
import html
import http.client
import os
import re
import urllib.parse

import pytest

import bx24ast
from b24_emulator import Bitrix24Emulator
from conftest import FIXTURES
from fake_ami import FakeAmiServer

PASSWORD = "correct horse battery"
PJSIP = os.path.join(FIXTURES, "asterisk-22.10.1-pjsip")


class Browser(object):
    """Cookies, redirects not followed, forms posted with the page's CSRF token."""

    def __init__(self, port):
        self.port = port
        self.cookies = {}
        self.last = ""
        self.set_cookie_headers = []

    def request(self, verb, path, fields=None, csrf=True):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Cookie": "; ".join("%s=%s" % kv for kv in self.cookies.items())}
        body = None
        if fields is not None:
            fields = dict(fields)
            if csrf and "csrf" not in fields:
                m = re.search(r"name=csrf value='([^']+)'", self.last)
                fields["csrf"] = m.group(1) if m else ""
            body = urllib.parse.urlencode(fields)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(verb, path, body, headers)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8")
        conn.close()
        for name, value in resp.getheaders():
            if name.lower() == "set-cookie":
                self.set_cookie_headers.append(value)
                cname, _, rest = value.partition("=")
                cvalue = rest.split(";")[0]
                if "Max-Age=0" in value:
                    self.cookies.pop(cname, None)
                else:
                    self.cookies[cname] = cvalue
        if resp.status == 200 or resp.status == 400:
            self.last = text
        return resp.status, text, resp.getheader("Location")

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, fields, csrf=True):
        return self.request("POST", path, fields, csrf)

    def login(self, user="admin", password=PASSWORD):
        self.get("/config/master/login")
        return self.post("/config/master/login", {"user": user, "password": password})


@pytest.fixture
def wizard_env(tmp_path):
    conf = str(tmp_path / "bx24ast.conf")
    with open(conf, "w") as f:
        f.write(bx24ast.example_config_text())
    hashed = bx24ast.hash_password(PASSWORD)
    bx24ast.update_config_file(conf, {("wizard", "password_hash"): hashed,
                                      ("storage", "state_dir"): str(tmp_path / "state")})
    root = tmp_path / "root"
    (root / "etc" / "asterisk").mkdir(parents=True)
    (root / "etc" / "asterisk" / "manager.conf").write_text("[general]\nenabled = yes\nport = 5038\n\n"
                                                            "[admin]\nsecret = amp111\nread = all\nwrite = all\n")
    stub = tmp_path / "asterisk"
    stub.write_text("#!/bin/sh\necho \"$@\" >> %s\necho 'Reloading manager'\n" % (tmp_path / "asterisk.log"))
    stub.chmod(0o755)
    saved = []
    wizard = bx24ast.SetupWizard(conf, root=str(root), asterisk_command=[str(stub), "-rx"],
                                 on_saved=lambda: saved.append(True), timeout=3)
    bx24ast.WizardServer.sessions.clear()
    bx24ast.WizardServer.failures.clear()
    server = bx24ast.WizardServer(wizard, "admin", hashed, "127.0.0.1", 0)
    server.start()
    try:
        yield {"conf": conf, "server": server, "browser": Browser(server.address[1]), "saved": saved,
               "root": root, "tmp": tmp_path}
    finally:
        server.stop()


def plain(page):
    """The text a person reads on a page: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", page)))


def field_block(page, name):
    """The block of one field (label, input, error, help) on a step page."""
    m = re.search(r"<div class='field[^']*'>(?:(?!<div class='field).)*?name='%s'.*?</div>" % re.escape(name), page)
    return m.group(0) if m else ""


def step(browser, name, fields, action="next"):
    browser.get("/config/master/%s" % name)
    fields = dict(fields, action=action)
    return browser.post("/config/master/%s" % name, fields)


def test_login_sessions_and_cookies(wizard_env):
    b = wizard_env["browser"]
    status, _, where = b.get("/config/master/database")
    assert status == 303 and where == "/config/master/login"
    status, text, _ = b.login(password="wrong password!")
    assert status == 200 and "Wrong login or password." in text and "bx24ast_session" not in b.cookies
    status, _, where = b.login()
    assert status == 303 and where == "/config/master/language"
    session_cookie = [c for c in b.set_cookie_headers if c.startswith("bx24ast_session=")][-1]
    assert "HttpOnly" in session_cookie and "SameSite=Strict" in session_cookie
    assert b.get("/config/master/database")[0] == 200
    b.get("/config/master/language")
    assert b.post("/config/master/logout", {})[0] == 303
    assert b.get("/config/master/database")[0] == 303


def test_brute_force_waits_and_login_needs_its_csrf(wizard_env):
    b = wizard_env["browser"]
    b.get("/config/master/login")
    assert b.post("/config/master/login", {"user": "admin", "password": PASSWORD, "csrf": "forged"})[0] == 403
    for _ in range(5):
        assert b.login(password="not the password")[0] == 200
    status, text, _ = b.login()   # even the right password waits now
    assert status == 429 and "Too many failed logins: wait" in text
    assert "bx24ast_session" not in b.cookies
    # another address is not held back
    bx24ast.WizardServer.failures.clear()
    assert b.login()[0] == 303


def test_forms_without_the_csrf_token_are_refused(wizard_env):
    b = wizard_env["browser"]
    b.login()
    before = open(wizard_env["conf"]).read()
    status, text, _ = b.post("/config/master/ami", {"ami.port": "5039", "action": "next"}, csrf=False)
    assert status == 403 and "CSRF" in text
    assert b.post("/config/master/save", {"action": "save", "csrf": "x" * 24})[0] == 403
    assert open(wizard_env["conf"]).read() == before and not wizard_env["saved"]


def test_bad_values_get_an_error_by_their_field_and_nothing_is_saved(wizard_env):
    b = wizard_env["browser"]
    b.login()
    before = open(wizard_env["conf"]).read()
    status, text, _ = step(b, "language", {"wizard.language": "xx"})
    assert status == 400 and "one of: en, ru" in plain(text)
    status, text, _ = step(b, "database", {"cel.backend": "mysql", "cel.mysql_port": "abc"})
    assert status == 400
    field = field_block(text, "cel.mysql_port")
    assert "expected a whole number" in plain(field) and "value='abc'" in field
    status, text, _ = step(b, "ami", {"ami.host": "127.0.0.1", "ami.port": "70000", "ami.username": "x"})
    assert status == 400 and "a whole number from 1 to 65535" in plain(field_block(text, "ami.port"))
    status, text, _ = step(b, "bitrix24", {"bitrix24.connection": "webhook", "bitrix24.webhook_url": "http://portal/no-rest"})
    assert status == 400 and "/rest/<user>/<token>/" in plain(field_block(text, "bitrix24.webhook_url"))
    status, text, _ = step(b, "click_to_call", {"click_to_call.mode": "port", "click_to_call.listen": "0.0.0.0:8077",
                                                "click_to_call.phone_channel": "Local/{extension}@from-internal",
                                                "click_to_call.outbound_context": "from-internal"})
    assert status == 400 and "needed in port mode" in plain(field_block(text, "click_to_call.application_token"))
    status, text, _ = step(b, "crm", {"crm.mode": "leads", "crm.default_user_id": "1", "routing.agi_listen": "",
                                      "line_count": "1", "line_did_0": "<script>alert(1)</script>",
                                      "line_source_0": "WEB"})
    assert status == 400 and "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    b.get("/config/master/save")
    assert "Nothing changed." in plain(b.last)
    assert open(wizard_env["conf"]).read() == before


def test_every_step_good_values_checks_and_save(wizard_env):
    b = wizard_env["browser"]
    b.login()
    conf = wizard_env["conf"]
    # language: remembered, pages follow it
    status, _, where = step(b, "language", {"wizard.language": "ru"})
    assert status == 303 and where == "/config/master/database"
    assert "bx24ast_lang=ru" in "".join(b.set_cookie_headers)
    status, text, _ = b.get("/config/master/database")
    assert "База CEL" in text
    b.get("/config/master/database?lang=en")   # the rest of this test reads the English texts
    # database: a real CEL database, checked
    cel = os.path.join(PJSIP, "inbound_answered", "cel.sqlite3")
    status, text, _ = step(b, "database", {"cel.backend": "sqlite", "cel.sqlite_path": cel, "cel.table": "cel",
                                           "cel.mysql_port": "3306", "cel.mysql_host": "localhost",
                                           "cel.mysql_database": "asteriskcdrdb"}, action="check")
    assert status == 200 and "no CEL event written in the last 1 hour" in plain(text) and "badge WARNING" in text
    assert step(b, "database", {"cel.backend": "sqlite", "cel.sqlite_path": cel, "cel.table": "cel",
                                "cel.mysql_port": "3306", "cel.mysql_host": "localhost",
                                "cel.mysql_database": "asteriskcdrdb"})[0] == 303
    # AMI: create the bx24 user, then the Check logs in with it
    from test_discovery import PJSIP_ENDPOINTS, PJSIP_REGISTRATIONS
    with FakeAmiServer(lists={"PJSIPShowEndpoints": PJSIP_ENDPOINTS,
                              "PJSIPShowRegistrationsOutbound": PJSIP_REGISTRATIONS}) as ami:
        status, text, _ = step(b, "ami", {}, action="create_ami_user")
        manager = (wizard_env["root"] / "etc" / "asterisk" / "manager.conf").read_text()
        assert "[admin]\nsecret = amp111" in manager
        section = manager[manager.index("[bx24]"):]
        secret = re.search(r"secret = (\S+)", section).group(1)
        assert "read = %s" % bx24ast.AMI_USER_READ in section and "write = %s" % bx24ast.AMI_USER_WRITE in section
        assert "permit = 127.0.0.1" in section and len(secret) >= 20
        assert "manager reload" in (wizard_env["tmp"] / "asterisk.log").read_text()
        assert "AMI reloaded" in plain(text) and secret not in text   # the secret is never shown
        ami.username, ami.secret = "bx24", secret
        status, text, _ = step(b, "ami", {"ami.host": "127.0.0.1", "ami.port": str(ami.port),
                                          "ami.username": "bx24"}, action="check")
        assert "logged in to 127.0.0.1:%d as bx24" % ami.port in plain(text), text
        assert secret not in text
        # and what Asterisk says its trunks and phones are
        assert "trunks: PJSIP/trunk-operator" in plain(text) and "PJSIP/7001 (registers to a provider" in plain(text)
        assert "phones: PJSIP/101" in plain(text) and "PJSIP/gateway" in plain(text)
        assert step(b, "ami", {"ami.host": "127.0.0.1", "ami.port": str(ami.port), "ami.username": "bx24"})[0] == 303
        # a wrong secret fails the check, saying so
        ami.secret = "something else"
        status, text, _ = step(b, "ami", {"ami.host": "127.0.0.1", "ami.port": str(ami.port),
                                          "ami.username": "bx24"}, action="check")
        assert "badge CRITICAL" in text and "Authentication failed" in plain(text)
        # ...and a secret that failed its check is not kept
        assert wizard_env["server"].sessions and all(
            s["draft"].get(("ami", "secret")) == secret for s in wizard_env["server"].sessions.values())
    # recordings
    recordings = os.path.join(PJSIP, "inbound_answered", "recordings")
    status, text, _ = step(b, "recordings", {"recordings.path": recordings, "pbx.recording_format": "wav",
                                             "recordings.attach": "yes"}, action="check")
    assert "recordings, mostly .wav" in plain(text)
    assert step(b, "recordings", {"recordings.path": recordings, "pbx.recording_format": "wav",
                                  "recordings.attach": "yes"})[0] == 303
    with Bitrix24Emulator() as emu:
        # portal: scopes and the extension map
        fields = {"bitrix24.webhook_url": emu.webhook_url}
        status, text, _ = step(b, "bitrix24", fields, action="check")
        assert "scopes telephony crm user task granted" in plain(text)
        assert "101 -> user 5, 102 -> user 7, 103 -> user 9" in plain(text)
        assert step(b, "bitrix24", fields)[0] == 303
        # CRM: lead sources from the portal, a line table, the dialplan to paste
        status, text, _ = b.get("/config/master/crm")
        assert "<option value='ADVERTISING'>Advertising</option>" in text
        assert "AGI(agi://" not in text   # no dialplan before the fallback is chosen
        assert step(b, "crm", {"crm.mode": "contacts", "crm.create": "yes", "crm.default_user_id": "7",
                               "routing.agi_listen": "127.0.0.1:4573", "routing.fallback": "ext-group,600,1",
                               "line_count": "2", "line_did_0": "8 (495) 123-45-67", "line_source_0": "ADVERTISING",
                               "line_did_1": "", "line_source_1": ""})[0] == 303
        status, text, _ = b.get("/config/master/crm")
        assert bx24ast.routing_dialplan(("127.0.0.1", 4573), "ext-group,600,1") in html.unescape(text)
        assert step(b, "click_to_call", {"click_to_call.mode": "port", "click_to_call.listen": "0.0.0.0:8077",
                                         "click_to_call.application_token": "tok3n-from-b24",
                                         "click_to_call.public_url": "https://pbx.example.com:8077/b24",
                                         "click_to_call.phone_channel": "Local/{extension}@from-internal",
                                         "click_to_call.outbound_context": "from-internal"})[0] == 303
        assert not wizard_env["saved"]
        # save: the summary masks secrets, then the file is written and the service told
        status, text, _ = b.get("/config/master/save")
        assert "[crm] mode" in text and "[lines]" in text and "+74951234567 = ADVERTISING" in text
        assert "tok3n-from-b24" not in text and secret not in text and "***" in text
        status, _, where = b.post("/config/master/save", {"action": "save"})
        assert status == 303 and where.startswith("/config/master/results?saved=") and wizard_env["saved"] == [True]
        config = bx24ast.Config.load(conf)
        assert config.get("ami", "username") == "bx24" and config.get("ami", "secret") == secret
        assert config.get("crm", "mode") == "contacts" and config.get("crm", "default_user_id") == 7
        assert config.maps["lines"] == {"+74951234567": "ADVERTISING"}
        assert config.get("click_to_call", "application_token") == "tok3n-from-b24"
        assert config.get("wizard", "language") == "ru" and config.get("cel", "sqlite_path") == cel
        assert oct(os.stat(conf).st_mode & 0o777) == "0o600"
        assert bx24ast.verify_password(PASSWORD, config.get("wizard", "password_hash"))
        # secrets already set are not sent back into the forms
        status, text, _ = b.get("/config/master/click_to_call")
        assert "tok3n-from-b24" not in text and "placeholder='set; leave empty to keep" in text
        # the results page says what `check` says
        status, text, _ = b.get("/config/master/results")
        assert status == 200
        rows = re.findall(r"<li class=(\w+)><span class='badge \w+'>[^<]*</span> <span class=name>([^<]+)</span> "
                          r"(.*?)(?:<p class=advice>.*?)?</li>", text)
        expected = bx24ast.run_checks(config)
        assert [(r[0], r[1]) for r in rows] == [(c.level, c.name) for c in expected]
        assert [plain(r[2]).strip() for r in rows][1:] == [c.message for c in expected][1:]


def test_the_daemon_serves_the_wizard_and_reloads_after_a_save(tmp_path):
    import threading
    from conftest import wait_for
    conf = str(tmp_path / "bx24ast.conf")
    with FakeAmiServer() as ami:
        with open(conf, "w") as f:
            f.write("[ami]\nhost = 127.0.0.1\nport = %d\nusername = bx24\nsecret = s3cret\n[routing]\n"
                    "agi_listen =\nhttp_listen =\n[wizard]\nlisten = 127.0.0.1:0\n[storage]\nstate_dir = %s\n"
                    % (ami.port, tmp_path))
        bx24ast.update_config_file(conf, {("wizard", "password_hash"): bx24ast.hash_password(PASSWORD)})
        daemon = bx24ast.Daemon(bx24ast.Config.load(conf))
        daemon.config_loader = lambda: bx24ast.Config.load(conf)
        thread = threading.Thread(target=daemon.run)
        thread.start()
        try:
            assert wait_for(lambda: daemon.listeners, 10)
            label, server = daemon.listeners[0]
            assert label.startswith("wizard")
            b = Browser(server.address[1])
            assert b.login()[0] == 303
            assert step(b, "recordings", {"recordings.path": str(tmp_path), "pbx.recording_format": "mp3",
                                          "recordings.attach": "yes"})[0] == 303
            b.get("/config/master/save")
            status, _, where = b.post("/config/master/save", {"action": "save"})
            assert status == 303
            thread.join(15)
            assert not thread.is_alive()
            assert daemon.next_config.get("pbx", "recording_format") == "mp3"
            # main() starts the service anew with the new file; Results waits for that
            daemon = bx24ast.Daemon(daemon.next_config)
            thread = threading.Thread(target=daemon.run)
            thread.start()
            assert wait_for(lambda: daemon.listeners, 10)
            b.port = daemon.listeners[0][1].address[1]
            status, text, _ = b.get(where)
            assert status == 200 and "Saved. The service has read the new configuration." in plain(text)
            beat = bx24ast.Heartbeat(str(tmp_path)).read()
            assert beat["started_at"] >= int(where.rsplit("=", 1)[1]) - 1
        finally:
            daemon.stop()
            thread.join(15)


def test_local_application_authorization_code(wizard_env):
    b = wizard_env["browser"]
    b.login()
    with Bitrix24Emulator() as emu:
        # the OAuth server is the emulator's (an advanced key, not on the form)
        bx24ast.update_config_file(wizard_env["conf"], {("bitrix24", "oauth_url"): emu.oauth_url})
        fields = {"bitrix24.connection": "application", "bitrix24.portal_url": emu.url + "/",
                  "bitrix24.client_id": emu.client_id, "bitrix24.client_secret": emu.client_secret}
        status, text, _ = step(b, "bitrix24", dict(fields, oauth_code="not-a-code"))
        assert status == 400 and "the code was refused" in plain(text)
        emu.auth_codes.add("code77")
        status, text, _ = step(b, "bitrix24", dict(fields, oauth_code="code77"))
        assert status == 200 and "tokens saved" in plain(text) and emu.client_secret not in text
        store = bx24ast.StateStore.open_dir(str(wizard_env["tmp"] / "state"))
        try:
            assert store.get_setting(bx24ast.BitrixClient.TOKENS_KEY)["access_token"] in emu.tokens
        finally:
            store.close()


def test_recordings_step_offers_what_the_pbx_uses(wizard_env):
    b = wizard_env["browser"]
    b.login()
    spool = wizard_env["tmp"] / "spool" / "monitor" / "2026" / "11" / "26"
    spool.mkdir(parents=True)
    for i in range(3):
        (spool / ("in-101-%d.mp3" % i)).write_bytes(b"ID3")
    (wizard_env["root"] / "etc" / "asterisk" / "globals_custom.conf").write_text(
        "MIXMON_FORMAT = mp3\nMIXMON_DIR = %s/\n" % (wizard_env["tmp"] / "spool" / "monitor"))
    status, text, _ = b.get("/config/master/recordings")
    assert "dialplan: MIXMON_FORMAT = mp3" in plain(text) and "3 recordings, mostly .mp3" in plain(text)
    assert "name='recordings.path' value='%s'" % (wizard_env["tmp"] / "spool" / "monitor") in text
    assert "<option value='mp3' selected>MP3</option>" in text
    status, text, _ = step(b, "recordings", {"recordings.path": str(wizard_env["tmp"] / "nowhere"),
                                             "pbx.recording_format": "mp3", "recordings.attach": "yes"},
                           action="check")
    assert "badge CRITICAL" in text and "does not exist" in plain(text)
    # "found on this PBX" speaks of the path typed, not of the one saved
    found = re.search(r"<section class=found>.*?</section>", text).group(0)
    assert "nowhere: no recordings found there" in plain(found) and "mostly .mp3" not in plain(found)


def test_the_wizard_over_https_sets_secure_cookies(tmp_path):
    import shutil
    import ssl
    import subprocess
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.check_call(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                           "/CN=127.0.0.1", "-keyout", key, "-out", cert],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conf = str(tmp_path / "bx24ast.conf")
    hashed = bx24ast.hash_password(PASSWORD)
    bx24ast.update_config_file(conf, {("wizard", "password_hash"): hashed})
    server = bx24ast.WizardServer(bx24ast.SetupWizard(conf), "admin", hashed, "127.0.0.1", 0, cert, key)
    server.start()
    try:
        context = ssl.create_default_context(cafile=cert)
        context.check_hostname = False
        conn = http.client.HTTPSConnection("127.0.0.1", server.address[1], timeout=10, context=context)
        conn.request("GET", "/config/master/login")
        resp = conn.getresponse()
        assert resp.status == 200 and b"password" in resp.read()
        cookie = resp.getheader("Set-Cookie")
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert resp.getheader("Strict-Transport-Security", "").startswith("max-age=")
        conn.close()
    finally:
        server.stop()
    with pytest.raises(bx24ast.ConfigError) as err:
        bx24ast.WizardServer(bx24ast.SetupWizard(conf), "admin", "", "127.0.0.1", 0)
    assert "password_hash" in str(err.value)


def _get(port, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read().decode("utf-8")
    conn.close()
    return resp.status, body


def test_status_json_for_monitoring_needs_the_token_or_the_login(tmp_path):
    import base64
    import json
    import time
    conf = str(tmp_path / "bx24ast.conf")
    hashed = bx24ast.hash_password(PASSWORD)
    bx24ast.update_config_file(conf, {("wizard", "password_hash"): hashed, ("storage", "state_dir"): str(tmp_path),
                                      ("users", "104"): "11"})
    store = bx24ast.StateStore.open_dir(str(tmp_path))
    now = time.time()
    for lid, direction, answered, finished in (("1.1", "inbound", 1, now), ("1.2", "inbound", 0, now),
                                               ("1.3", "outbound", 1, None)):
        store.db.execute("INSERT INTO calls (linkedid, direction, answered, started_at, ended_at, finished_at, "
                         "source) VALUES (?, ?, ?, ?, ?, ?, 'live')", (lid, direction, answered, now - 60, now - 30,
                                                                       finished))
    bx24ast.Outbox(store).add("1.3", "finish", "telephony.externalcall.finish", {}, bx24ast.PRIORITY_CARD)
    store.close()
    live = {"pid": 1, "started_at": now - 3600, "ami": {"host": "127.0.0.1", "port": 5038, "connected": True},
            "calls": [{"linkedid": "9.9", "direction": "inbound", "number": "+79161234567", "extension": "101",
                       "since": now - 42, "answered": True}],
            "users": {"map": {"101": 5}, "loaded_at": now - 120},
            "warnings": [{"time": now - 5, "level": "WARNING", "message": "Bitrix24 answers slowly"}]}
    bx24ast.WizardServer.failures.clear()
    server = bx24ast.WizardServer(bx24ast.SetupWizard(conf), "admin", hashed, "127.0.0.1", 0,
                                  live_status=lambda: live, status_token="m0nitor-t0ken")
    server.start()
    try:
        port = server.address[1]
        assert _get(port, "/status")[0] == 401
        assert _get(port, "/status", {"Authorization": "Bearer wrong"})[0] == 401
        status, body = _get(port, "/status", {"Authorization": "Bearer m0nitor-t0ken"})
        assert status == 200
        st = json.loads(body)
        assert st["running"] and st["today"] == {"calls": 3, "reported": 2, "missed": 1, "waiting": 1}
        assert st["outbox"]["pending"] == 1 and st["outbox"]["oldest_seconds"] >= 0
        assert st["users"]["map"] == {"101": 5, "104": 11}
        assert st["calls_in_progress"][0]["number"] == "+79161234567"
        assert st["warnings"][0]["message"] == "Bitrix24 answers slowly"
        login = base64.b64encode(("admin:" + PASSWORD).encode()).decode()
        assert _get(port, "/status", {"Authorization": "Basic " + login})[0] == 200
        # wrong logins through /status count like those of the login page
        bad = base64.b64encode(b"admin:not the password").decode()
        codes = [_get(port, "/status", {"Authorization": "Basic " + bad})[0] for _ in range(6)]
        assert codes[:5] == [401] * 5 and codes[5] == 429
        # the page shows the same, in words
        bx24ast.WizardServer.failures.clear()
        b = Browser(port)
        b.login()
        status, text, _ = b.get("/config/master/status")
        words = plain(text)
        assert status == 200 and "Calls in progress: 1" in words and "+79161234567" in words
        assert "3: reported 2, missed 1, waiting for Bitrix24 1" in words
        assert "list read 2 minutes" in words and "Bitrix24 answers slowly" in words
    finally:
        server.stop()


def test_the_readme_shows_the_dialplan_the_wizard_writes():
    with open(os.path.join(os.path.dirname(FIXTURES), "..", "README.md"), encoding="utf-8") as f:
        readme = f.read()
    block = re.search(r"\n    \[bx24-responsible\]\n(?:    .*\n)+", readme).group(0)
    shown = "\n".join(line[4:] for line in block.strip("\n").split("\n"))
    assert shown == bx24ast.routing_dialplan(("0.0.0.0", 4573), "ext-group,600,1")


def test_the_ami_help_names_the_rights_create_gives(wizard_env):
    doc = bx24ast._SCHEMA_BY_KEY[("ami", "username")][4]
    assert bx24ast.AMI_USER_READ in doc and bx24ast.AMI_USER_WRITE in doc
    b = wizard_env["browser"]
    b.login()
    text = plain(b.get("/config/master/ami")[1])
    assert "read = %s and write = %s" % (bx24ast.AMI_USER_READ, bx24ast.AMI_USER_WRITE) in text


def test_the_status_page_names_each_pbx_and_its_calls(tmp_path):
    import time
    conf = str(tmp_path / "bx24ast.conf")
    hashed = bx24ast.hash_password(PASSWORD)
    bx24ast.update_config_file(conf, {("wizard", "password_hash"): hashed, ("storage", "state_dir"): str(tmp_path)})
    now = time.time()
    office = {"host": "127.0.0.1", "port": 5038, "connected": True}
    live = {"pid": 1, "started_at": now - 60, "ami": office,
            "pbxs": [dict(office, name=""), {"name": "branch", "host": "10.0.2.5", "port": 5038, "connected": False,
                                             "last_error": "connection refused"}],
            "calls": [{"linkedid": "9.9", "pbx": "branch", "direction": "inbound", "number": "+79161234567",
                       "extension": "201", "since": now - 42, "answered": True}]}
    server = bx24ast.WizardServer(bx24ast.SetupWizard(conf), "admin", hashed, "127.0.0.1", 0,
                                  live_status=lambda: live)
    server.start()
    try:
        bx24ast.WizardServer.failures.clear()
        b = Browser(server.address[1])
        b.login()
        status, text, _ = b.get("/config/master/status")
        words = plain(text)
        assert status == 200
        assert "Asterisk (AMI)connected 127.0.0.1:5038" in words
        assert "Asterisk (AMI) branchnot connected 10.0.2.5:5038 — connection refused" in words
        assert "201 (branch)" in words
    finally:
        server.stop()
