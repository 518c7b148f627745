"""The Bitrix24 REST client on its own: auth, errors, bucket, batch, redirects."""
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

import bx24ast
from b24_emulator import Bitrix24Emulator


@pytest.mark.parametrize("status, error, cls", [
    (503, "QUERY_LIMIT_EXCEEDED", bx24ast.BitrixRateLimited),
    (429, "OPERATION_TIME_LIMIT", bx24ast.BitrixMethodLimited),
    (503, "OVERLOAD_LIMIT", bx24ast.BitrixOverloaded),
    (401, "expired_token", bx24ast.BitrixAuthExpired),
    (401, "invalid_token", bx24ast.BitrixAuthExpired),
    (401, "NO_AUTH_FOUND", bx24ast.BitrixAuthFailed),
    (401, "INVALID_CREDENTIALS", bx24ast.BitrixAuthFailed),
    (403, "WRONG_AUTH_TYPE", bx24ast.BitrixAuthFailed),
    (403, "ACCESS_DENIED", bx24ast.BitrixAuthFailed),
    (401, "insufficient_scope", bx24ast.BitrixAuthFailed),
    (500, "INTERNAL_SERVER_ERROR", bx24ast.BitrixUnavailable),
    (502, "", bx24ast.BitrixUnavailable),
    (400, "ERROR_CORE", bx24ast.BitrixRejected),
    (400, "", bx24ast.BitrixRejected),
    (404, "ERROR_METHOD_NOT_FOUND", bx24ast.BitrixRejected),
])
def test_error_classification(status, error, cls):
    exc = bx24ast.classify_error(status, {"error": error, "error_description": "x"}, "m")
    assert type(exc) is cls


def test_wrong_auth_type_says_what_to_do():
    exc = bx24ast.classify_error(403, {"error": "WRONG_AUTH_TYPE", "error_description": "denied"},
                                 "telephony.externalcall.register")
    assert "local application" in str(exc) and "telephony.externalcall.register" in str(exc)


def test_leaky_bucket_matches_the_portal():
    now = [0.0]
    bucket = bx24ast.LeakyBucket(2.0, 50, clock=lambda: now[0])
    waits = [bucket.take() for _ in range(50)]
    assert waits == [0.0] * 50
    assert bucket.take() == pytest.approx(0.5)
    now[0] += 10.0  # drains 20
    assert bucket.delay() == 0.0
    assert bucket.fill() == pytest.approx((51 - 20) / 50.0)


def test_php_query_encoding():
    q = bx24ast.php_query({"fields": {"TITLE": "a&b", "PHONE": [{"VALUE": "+7916"}]}, "USER_ID": [1, 2],
                           "CALL_ID": "$result[r1][CALL_ID]", "SHOW": True})
    assert "fields[TITLE]=a%26b" in q and "fields[PHONE][0][VALUE]=%2B7916" in q
    assert "USER_ID[1]=2" in q and "CALL_ID=$result[r1][CALL_ID]" in q and "SHOW=1" in q


def test_webhook_call_and_batch_with_references(tmp_path):
    with Bitrix24Emulator() as emu:
        client = bx24ast.BitrixClient(webhook_url=emu.webhook_url)
        users = client.call("user.get", {"FILTER": {"UF_PHONE_INNER": "102", "ACTIVE": True}})
        assert [u["ID"] for u in users] == ["7"]
        results, errors = client.batch([
            ("reg", "telephony.externalcall.register",
             {"USER_ID": 5, "PHONE_NUMBER": "+79161234567", "TYPE": 2, "EXTERNAL_CALL_ID": "1.1"}),
            ("show", "telephony.externalcall.show", {"CALL_ID": "$result[reg][CALL_ID]", "USER_ID": [7]}),
            ("bad", "telephony.externalcall.register", {"PHONE_NUMBER": "+7916", "TYPE": 2}),
        ])
        assert results["show"] is True and results["reg"]["CALL_ID"].startswith("externalCall.")
        assert errors["bad"]["error_description"] == "USER_ID or USER_PHONE_INNER should be set"
        assert emu.active_calls[results["reg"]["CALL_ID"]]["shown"] == {5, 7}
        with pytest.raises(bx24ast.BitrixRejected) as err:
            client.call("telephony.externalcall.finish", {"CALL_ID": 12, "USER_ID": 5})
        assert err.value.code == "INVALID_ARGUMENT"


def test_wrong_webhook_code_is_an_auth_failure_and_the_code_is_never_logged(caplog):
    with Bitrix24Emulator() as emu:
        bad = emu.webhook_url.replace(emu.webhook_code, "wrongcode123")
        client = bx24ast.BitrixClient(webhook_url=bad)
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(bx24ast.BitrixAuthFailed):
                client.call("user.get")
        assert "wrongcode123" not in caplog.text and "wrongcode123" not in client.describe()
        assert "/rest/1/***/" in client.describe()


def test_unreachable_portal_is_unavailable():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    client = bx24ast.BitrixClient(webhook_url="http://127.0.0.1:%d/rest/1/x/" % port, timeout=1)
    with pytest.raises(bx24ast.BitrixUnavailable):
        client.call("user.get")


def test_tls_is_verified_unless_told_otherwise():
    client = bx24ast.BitrixClient(webhook_url="https://example.invalid/rest/1/x/")
    handlers = [h for h in client._opener.handlers if hasattr(h, "_context")]
    assert handlers and handlers[0]._context.verify_mode.name == "CERT_REQUIRED"
    insecure = bx24ast.BitrixClient(webhook_url="https://example.invalid/rest/1/x/", verify_tls=False)
    handlers = [h for h in insecure._opener.handlers if hasattr(h, "_context")]
    assert handlers[0]._context.verify_mode.name == "CERT_NONE"


def test_oauth_refreshes_once_for_concurrent_callers(tmp_path):
    with Bitrix24Emulator() as emu:
        store = bx24ast.StateStore(str(tmp_path / "s.db"))
        client = bx24ast.BitrixClient(portal_url=emu.url + "/", client_id=emu.client_id,
                                      client_secret=emu.client_secret, oauth_url=emu.oauth_url, store=store)
        client.save_tokens(emu.issue_tokens())
        assert client.call("server.time")
        emu.expire_all_tokens()
        errors = []

        def worker():
            try:
                client.call("user.get")
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and emu.refreshes == 1
        # the new pair is stored; the old refresh token is dead
        assert client.tokens()["refresh_token"] in emu.refresh_tokens
        assert bx24ast.StateStore(str(tmp_path / "s.db")).get_setting(client.TOKENS_KEY)["access_token"] in emu.tokens


def test_oauth_code_exchange_and_invalid_grant(tmp_path):
    with Bitrix24Emulator() as emu:
        store = bx24ast.StateStore(str(tmp_path / "s.db"))
        client = bx24ast.BitrixClient(portal_url=emu.url + "/", client_id=emu.client_id,
                                      client_secret=emu.client_secret, oauth_url=emu.oauth_url, store=store)
        with pytest.raises(bx24ast.BitrixAuthFailed) as err:
            client.call("user.get")
        assert "oauth-code" in str(err.value)
        emu.auth_codes.add("code42")
        client.exchange_code("code42")
        assert client.call("user.get")
        with pytest.raises(bx24ast.BitrixAuthFailed):
            client.exchange_code("code42")  # used already: invalid_grant


def test_302_from_a_renamed_portal_is_followed_with_the_body():
    with Bitrix24Emulator() as emu:
        class Moved(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(302)
                self.send_header("Location", emu.webhook_url + self.path.rsplit("/", 1)[-1])
                self.send_header("Content-Length", "0")
                self.end_headers()
        old = HTTPServer(("127.0.0.1", 0), Moved)
        t = threading.Thread(target=old.serve_forever)
        t.start()
        try:
            client = bx24ast.BitrixClient(webhook_url="http://127.0.0.1:%d/rest/1/%s/"
                                          % (old.server_address[1], emu.webhook_code))
            users = client.call("user.get", {"FILTER": {"UF_PHONE_INNER": "103"}})
            assert [u["ID"] for u in users] == ["9"]
        finally:
            old.shutdown()
            old.server_close()
            t.join()


def test_client_bucket_never_triggers_the_portal_limit():
    with Bitrix24Emulator(rate=20.0, burst=5) as emu:
        client = bx24ast.BitrixClient(webhook_url=emu.webhook_url, rate=20.0, burst=5)
        for _ in range(30):
            client.call("server.time")
        assert emu.rejected_503 == 0 and emu.max_level <= 5


@pytest.mark.parametrize("kept", [True, False], ids=["level-kept", "level-lost"])
def test_a_restart_does_not_burst_into_a_full_portal_bucket(tmp_path, kept):
    """The portal's bucket does not empty because bx24ast restarted: the level is kept
    with its time. (level-lost shows what a restart without it costs: 503s.)"""
    with Bitrix24Emulator(rate=2.0, burst=50) as emu:
        store = bx24ast.StateStore.open_dir(str(tmp_path))
        first = bx24ast.BitrixClient(emu.webhook_url, store=store, rate=2.0, burst=50)
        for _ in range(44):
            first.call("profile")
        first.save_bucket()
        if not kept:
            store.execute("DELETE FROM settings WHERE key = ?", (bx24ast.BitrixClient.BUCKET_KEY,))
        second = bx24ast.BitrixClient(emu.webhook_url, store=store, rate=2.0, burst=50)
        rejected = 0
        for _ in range(10):
            try:
                second.call("profile")
            except bx24ast.BitrixRateLimited:
                rejected += 1
        store.close()
        assert (emu.rejected_503 == 0) == kept, emu.rejected_503
        assert rejected == emu.rejected_503


def test_a_plain_http_portal_costs_no_tls_context():
    client = bx24ast.BitrixClient(webhook_url="http://127.0.0.1:1/rest/1/x/")
    assert all(getattr(h, "_context", None) is None for h in client._opener.handlers)
