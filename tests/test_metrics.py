"""GET /metrics: Prometheus text, scraped and parsed; on the wizard only with its token."""
import http.client
import os

import bx24ast
from b24_emulator import Bitrix24Emulator
from conftest import FIXTURES, wait_for
from test_service import _parse_metrics
from test_wizard import PASSWORD

PJSIP = os.path.join(FIXTURES, "asterisk-22.10.1-pjsip")


def _get(port, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), body


def test_metrics_count_calls_latency_rest_and_hook_errors(tmp_path):
    hooks = tmp_path / "hooks.py"
    hooks.write_text("def process_final_params(params, call):\n    raise KeyError('VOTE')\n")
    with Bitrix24Emulator() as emu:
        text = ("[bitrix24]\nwebhook_url = %s\n[cel]\nbackend = off\n[storage]\nstate_dir = %s\n"
                "[recordings]\npath = %s\nsettle_seconds = 0\n[crm]\ncallback_window_minutes = 0\n"
                "[hooks]\nfile = %s\n[routing]\nagi_listen =\nhttp_listen =\n"
                % (emu.webhook_url, tmp_path, tmp_path, hooks))
        daemon = bx24ast.Daemon(bx24ast.Config.from_text(text))
        bridge = daemon.bridge
        bridge.start()
        try:
            for name in ("inbound_answered", "inbound_missed", "outbound_answered"):
                bx24ast.replay_capture(bx24ast.Capture(os.path.join(PJSIP, name)), daemon.pbxs[0].tracker)
            assert wait_for(lambda: len(emu.stats) == 3 and not bridge.outbox.counts().get("pending"), 30)
            metrics = _parse_metrics(daemon.metrics.render())
        finally:
            bridge.stop()
            bridge.store.close()

    def value(name, **labels):
        assert (name, frozenset(labels.items())) in metrics, sorted(k for k in metrics if k[0] == name)
        return metrics[(name, frozenset(labels.items()))]

    assert value("bx24ast_up") == 1
    assert value("bx24ast_calls_total", pbx="", direction="inbound", outcome="answered") == 1
    assert value("bx24ast_calls_total", pbx="", direction="inbound", outcome="missed") == 1
    assert value("bx24ast_calls_total", pbx="", direction="outbound", outcome="answered") == 1
    assert value("bx24ast_calls_in_progress", pbx="") == 0
    assert value("bx24ast_ami_connected", pbx="") == 0
    # every card went out: three registers with a popup (the ring group's shows ride along)
    count = value("bx24ast_card_latency_seconds_count")
    assert count >= 3 and value("bx24ast_card_latency_seconds_bucket", le="+Inf") == count
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in metrics.items()
                     if k[0] == "bx24ast_card_latency_seconds_bucket" and dict(k[1])["le"] != "+Inf")
    assert [v for _b, v in buckets] == sorted(v for _b, v in buckets)     # cumulative
    assert value("bx24ast_rest_requests_total", method="telephony.externalcall.finish", code="200") == 3
    # the missed caller was called back (outbound_answered): no task, and none counted
    assert not [k for k in metrics if ("method", "tasks.task.add") in k[1]]
    assert value("bx24ast_outbox_requests", state="pending") == 0
    assert value("bx24ast_outbox_requests", state="parked") == 0
    assert value("bx24ast_hook_errors_total", hook="process_final_params") == 3
    assert value("bx24ast_hook_calls_total", hook="process_final_params") == 3


def test_metrics_on_the_wizard_need_the_token(tmp_path):
    conf = tmp_path / "bx24ast.conf"
    conf.write_text("[storage]\nstate_dir = %s\n" % tmp_path)
    daemon = bx24ast.Daemon(bx24ast.Config.load(str(conf)))
    hashed = bx24ast.hash_password(PASSWORD, iterations=1000)
    for token, wanted in (("", 404), ("scr4pe-me", 200)):
        server = bx24ast.WizardServer(bx24ast.SetupWizard(str(conf)), "admin", hashed, "127.0.0.1", 0,
                                      metrics=daemon.metrics, metrics_token=token)
        server.start()
        try:
            port = server.address[1]
            status, _ctype, body = _get(port, "/metrics")
            assert status == (404 if not token else 401)
            assert ("[metrics] token" in body) if not token else "Bearer" in body
            status, ctype, body = _get(port, "/metrics", {"Authorization": "Bearer wrong"})
            assert status == (404 if not token else 401)
            status, ctype, body = _get(port, "/metrics", {"Authorization": "Bearer scr4pe-me"})
            assert status == wanted
            if wanted == 200:
                assert ctype.startswith("text/plain; version=0.0.4")
                assert _parse_metrics(body)[("bx24ast_up", frozenset())] == 1
        finally:
            server.stop()


def test_label_values_are_escaped():
    assert bx24ast._labels(hook='a"b\\c\nd') == 'hook="a\\"b\\\\c\\nd"'
