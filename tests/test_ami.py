"""AMI wire format, parser robustness, action matching, and the live connection
against a fake Asterisk serving real captures over loopback."""
import logging
import os
import random
import socket
import threading
import time

import pytest

import bx24ast
from conftest import FIXTURES, load_expected, wait_for
from fake_ami import FakeAmiServer
from test_calls import expected_row

PJSIP = os.path.join(FIXTURES, "asterisk-22.10.1-pjsip")
LOCAL = os.path.join(FIXTURES, "asterisk-22.10.1")
SCENARIOS = ["inbound_answered", "inbound_missed", "outbound_answered", "inbound_queue",
             "blind_transfer", "internal_call", "concurrent_burst", "click2call_originate"]


# -- build_action ------------------------------------------------------------------

def test_build_action_bytes():
    data = bx24ast.build_action("Originate", "id-1", [("Channel", "PJSIP/101"), ("Priority", 1),
                                                      ("Variable", ["A=1", "B=2"])])
    assert data == (b"Action: Originate\r\nActionID: id-1\r\nChannel: PJSIP/101\r\nPriority: 1\r\n"
                    b"Variable: A=1\r\nVariable: B=2\r\n\r\n")


@pytest.mark.parametrize("value", ["123\r\nAction: Command", "123\nAction: Command", "x\r", "a\0b"])
def test_build_action_refuses_cr_lf(value):
    with pytest.raises(bx24ast.AmiInjectionError) as err:
        bx24ast.build_action("Originate", "id", [("Exten", value)])
    assert "Exten" in str(err.value)


def test_build_action_refuses_bad_header_names():
    for name in ("Bad Name", "X\r\nAction", "", "1abc"):
        with pytest.raises(bx24ast.AmiInjectionError):
            bx24ast.build_action("Setvar", "id", [(name, "v")])


def test_injection_refused_before_anything_is_written():
    """originate/setvar with a hostile value: nothing at all reaches the socket."""
    a, b = socket.socketpair()
    try:
        conn = bx24ast.AmiConnection("127.0.0.1", 1, "u", "s", lambda m: None)
        conn._sock = a  # a connected session, as after login
        with pytest.raises(bx24ast.AmiInjectionError):
            conn.originate("Local/101@from-internal", "from-internal", "123\r\nAction: Command",
                           variables={"BX24_CALL_ID": "x"})
        with pytest.raises(bx24ast.AmiInjectionError):
            conn.setvar("PJSIP/101-1", "X", "v\r\nAction: Command\r\nCommand: core stop now")
        with pytest.raises(bx24ast.AmiInjectionError):
            conn.originate("PJSIP/101", "from-internal", "100", variables={"A\r\nB": "1"})
        b.settimeout(0.2)
        with pytest.raises(socket.timeout):
            b.recv(10)
        assert not conn.stream._pending
    finally:
        a.close()
        b.close()


# -- parser ----------------------------------------------------------------------------

def _capture_bytes(name="inbound_answered", base=PJSIP):
    with open(os.path.join(base, name, "ami.log"), "rb") as f:
        return f.read()


def _names(msgs):
    return [m.name for m in msgs]


def test_parser_same_messages_whatever_the_read_boundaries():
    data = _capture_bytes()
    whole = bx24ast.AmiParser().feed(data)
    assert len(whole) > 100
    rng = random.Random(7)
    for _ in range(5):
        parser = bx24ast.AmiParser()
        got = []
        pos = 0
        while pos < len(data):
            n = rng.choice([1, 2, 3, 7, 64, 1000, 5000])
            got.extend(parser.feed(data[pos:pos + n]))
            pos += n
        assert [dict(m) for m in got] == [dict(m) for m in whole]
    parser = bx24ast.AmiParser()
    assert parser.feed(data[:30]) == []
    assert parser.banner == "Asterisk Call Manager/11.0.0"


def test_parser_one_byte_at_a_time():
    data = _capture_bytes("inbound_missed")
    parser = bx24ast.AmiParser()
    got = []
    for i in range(len(data)):
        got.extend(parser.feed(data[i:i + 1]))
    assert len(got) == len(bx24ast.AmiParser().feed(data))


def test_parser_repeated_headers_and_output():
    parser = bx24ast.AmiParser()
    parser.reset(expect_banner=False)
    msgs = parser.feed(b"Event: Status\r\nChannel: PJSIP/101-1\r\nChanVariable: A=1\r\nChanVariable: B=2\r\n\r\n"
                       b"Response: Success\r\nActionID: 5\r\nMessage: Command output follows\r\n"
                       b"Output: line one\r\nOutput: line: two\r\n\r\n"
                       b"Response: Follows\r\nPrivilege: Command\r\nActionID: 6\r\n"
                       b"Name/username  Host\r\n101/101  10.0.0.5\r\n--END COMMAND--\r\n\r\n")
    assert msgs[0]["ChanVariable"] == ["A=1", "B=2"]
    assert msgs[0].all("ChanVariable") == ["A=1", "B=2"]
    assert msgs[1].output == ["line one", "line: two"]
    assert msgs[2].success and msgs[2].output == ["Name/username  Host", "101/101  10.0.0.5"]


def test_parser_empty_values_and_case():
    parser = bx24ast.AmiParser()
    parser.reset(expect_banner=False)
    [msg] = parser.feed(b"Event: Cdr\r\nAccountCode:\r\nUniqueID: 1.2\r\nDestination: 101\r\n\r\n")
    assert msg["AccountCode"] == ""
    assert msg.header("Uniqueid") == "1.2" and msg.get("Uniqueid") is None


def test_parser_skips_garbage_and_recovers(caplog):
    parser = bx24ast.AmiParser()
    parser.reset(expect_banner=False)
    with caplog.at_level(logging.WARNING):
        msgs = parser.feed(b"\x00\xff garbage without structure\r\n\r\n"
                           b"Event: Hangup\r\nUniqueid: 1.1\r\n\r\n"
                           b"HTTP/1.1 400 Bad Request\r\n\r\n"
                           b"Event: Newchannel\r\nUniqueid: 1.2\r\n\r\n")
    assert _names(msgs) == ["Hangup", "Newchannel"]
    assert parser.skipped_garbage == 2
    assert "not an AMI message" in caplog.text


def test_parser_oversized_message_is_skipped_with_bounded_memory(caplog):
    parser = bx24ast.AmiParser(max_message_bytes=64 * 1024)
    parser.reset(expect_banner=False)
    chunk = b"X" * 65536
    with caplog.at_level(logging.WARNING):
        assert parser.feed(b"Event: Huge\r\nData: ") == []
        for _ in range(160):  # a 10 MB line
            assert parser.feed(chunk) == []
            assert len(parser._buf) <= 64 * 1024
        msgs = parser.feed(b"\r\n\r\nEvent: Hangup\r\nUniqueid: 9.9\r\n\r\n")
    assert _names(msgs) == ["Hangup"]
    assert parser.skipped_oversize == 1
    assert "max_message_bytes" in caplog.text
    # a complete message over the limit inside one read is dropped too
    msgs = parser.feed(b"Event: Big\r\nData: " + b"Y" * 70000 + b"\r\n\r\nEvent: Hangup\r\nUniqueid: 1\r\n\r\n")
    assert _names(msgs) == ["Hangup"]


def test_parser_missing_blank_line_splits_messages(caplog):
    parser = bx24ast.AmiParser()
    parser.reset(expect_banner=False)
    with caplog.at_level(logging.WARNING):
        msgs = parser.feed(b"Event: Newchannel\r\nUniqueid: 1.1\r\nLinkedid: 1.1\r\n"
                           b"Event: Hangup\r\nUniqueid: 1.1\r\nCause: 16\r\n\r\n"
                           b"Event: Newstate\r\nUniqueid: 1.1\r\n\r\n")
    assert _names(msgs) == ["Newchannel", "Hangup", "Newstate"]
    assert msgs[0]["Uniqueid"] == "1.1" and "Cause" not in msgs[0]
    assert "blank line" in caplog.text


def test_parser_filters_unwanted_events_before_decoding():
    parser = bx24ast.AmiParser(wanted_events={b"VarSet", b"Hangup"}, wanted_variables={b"MIXMONITOR_FILENAME"})
    parser.reset(expect_banner=False)
    msgs = parser.feed(b"Event: Newexten\r\nUniqueid: 1\r\n\r\n"
                       b"Event: VarSet\r\nUniqueid: 1\r\nVariable: RTPAUDIOQOS\r\nValue: x\r\n\r\n"
                       b"Event: VarSet\r\nUniqueid: 1\r\nVariable: MIXMONITOR_FILENAME\r\nValue: /a.wav\r\n\r\n"
                       b"Event: Hangup\r\nUniqueid: 1\r\n\r\n"
                       b"Response: Success\r\nActionID: 1\r\n\r\n")
    assert _names(msgs) == ["VarSet", "Hangup", "Success"]
    assert parser.filtered == 2


# -- action matching -------------------------------------------------------------------

def test_stream_matches_responses_and_lists_by_action_id():
    events = []
    stream = bx24ast.AmiStream(events.append)
    stream.parser.reset(expect_banner=False)
    ping = bx24ast.PendingAction("Ping", "a1")
    channels = bx24ast.PendingAction("CoreShowChannels", "a2")
    originate = bx24ast.PendingAction("Originate", "a3")
    for p in (ping, channels, originate):
        stream.expect(p)
    stream.feed(b"Response: Success\r\nActionID: a2\r\nEventList: start\r\nMessage: Channels will follow\r\n\r\n"
                b"Event: Newchannel\r\nUniqueid: 5.5\r\n\r\n"
                b"Event: CoreShowChannel\r\nActionID: a2\r\nChannel: PJSIP/101-1\r\nUniqueid: 1.1\r\n\r\n"
                b"Response: Success\r\nActionID: a1\r\nPing: Pong\r\n\r\n"
                b"Event: CoreShowChannel\r\nActionID: a2\r\nChannel: PJSIP/102-2\r\nUniqueid: 1.2\r\n\r\n"
                b"Response: Success\r\nActionID: a3\r\nMessage: Originate successfully queued\r\n\r\n"
                b"Event: CoreShowChannelsComplete\r\nActionID: a2\r\nEventList: Complete\r\nListItems: 2\r\n\r\n"
                b"Event: OriginateResponse\r\nActionID: a3\r\nResponse: Success\r\nUniqueid: 7.7\r\n\r\n", 1.0)
    assert ping.done.is_set() and ping.response["Ping"] == "Pong"
    assert channels.done.is_set() and [e["Uniqueid"] for e in channels.events] == ["1.1", "1.2"]
    assert originate.done.is_set()
    # events that belong to no list go to the listener, OriginateResponse included
    assert [e.name for e in events] == ["Newchannel", "OriginateResponse"]
    assert not stream._pending


def test_stream_survives_a_failing_handler(caplog):
    def boom(msg):
        raise RuntimeError("bug")
    stream = bx24ast.AmiStream(boom)
    stream.parser.reset(expect_banner=False)
    with caplog.at_level(logging.ERROR):
        stream.feed(b"Event: Hangup\r\nUniqueid: 1\r\n\r\n", 1.0)
    assert "handling event Hangup failed" in caplog.text


# -- the live connection against the fake server ----------------------------------------

def make_connection(server, on_event=None, **kw):
    kw.setdefault("reconnect_max_delay", 1.0)
    return bx24ast.AmiConnection("127.0.0.1", server.port, kw.pop("username", "bx24"),
                                 kw.pop("secret", "s3cret"), on_event or (lambda m: None), **kw)


def test_login_ping_command_and_list_action():
    with FakeAmiServer() as server:
        conn = make_connection(server)
        conn.start()
        try:
            assert conn.connected.wait(5)
            assert conn.banner == "Asterisk Call Manager/11.0.0"
            assert conn.ping().response["Ping"] == "Pong"
            assert conn.command("core show version") == ["Asterisk 22.10.1 built by fake", "second line"]
            got = threading.Event()
            conn.core_show_channels(lambda p: got.set())
            assert got.wait(5)
            with pytest.raises(bx24ast.AmiActionFailed) as err:
                conn.action("NoSuchAction")
            assert "Invalid/unknown command" in str(err.value)
            login = [a for a in server.actions if a.get("Action") == "Login"][0]
            assert login["Events"] == "on" and login["ActionID"].startswith("bx24ast-")
            assert all(a.get("ActionID") for a in server.actions)
        finally:
            conn.stop()


def test_md5_login():
    with FakeAmiServer() as server:
        conn = make_connection(server, auth="md5")
        conn.start()
        try:
            assert conn.connected.wait(5)
            login = [a for a in server.actions if a.get("Action") == "Login"][0]
            assert "Secret" not in login and login["AuthType"] == "MD5"
        finally:
            conn.stop()


def test_wrong_secret_is_logged_and_retried(caplog):
    with FakeAmiServer() as server:
        conn = make_connection(server, secret="wrong", reconnect_max_delay=1.0)
        with caplog.at_level(logging.ERROR):
            conn.start()
            try:
                assert wait_for(lambda: server.connections >= 2)
                assert not conn.connected.is_set()
            finally:
                conn.stop()
        assert "login as 'bx24'" in caplog.text and "refused" in caplog.text


def test_not_an_ami_port_is_refused(caplog):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    stop = threading.Event()

    def http():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            c.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
            c.close()
    t = threading.Thread(target=http)
    t.start()
    conn = bx24ast.AmiConnection("127.0.0.1", srv.getsockname()[1], "u", "s", lambda m: None,
                                 reconnect_max_delay=1.0)
    with caplog.at_level(logging.ERROR):
        conn.start()
        assert wait_for(lambda: "not an Asterisk Manager Interface" in caplog.text)
        conn.stop()
    stop.set()
    srv.close()
    t.join()


def test_reconnects_when_asterisk_goes_away_and_comes_back():
    server = FakeAmiServer().start()
    port = server.port
    conn = make_connection(server, reconnect_max_delay=1.0)
    conn.start()
    try:
        assert conn.connected.wait(5)
        server.stop()
        assert wait_for(lambda: not conn.connected.is_set())
        with pytest.raises(bx24ast.AmiError):
            conn.ping(timeout=1)
        # Asterisk comes back on the same port
        server2 = FakeAmiServer()
        server2.sock.close()
        server2.sock = socket.socket()
        server2.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server2.sock.bind(("127.0.0.1", port))
        server2.sock.listen(4)
        server2.port = port
        server2.start()
        try:
            assert conn.connected.wait(10)
            assert conn.connects == 2
            assert conn.ping().response["Ping"] == "Pong"
        finally:
            server2.stop()
    finally:
        conn.stop()


def test_keepalive_ping_detects_a_silent_server(caplog):
    """A PBX that stops answering (hung, or a NAT dropped the session) is noticed by
    the unanswered Ping, and the connection is rebuilt."""
    class Silent(FakeAmiServer):
        def _answer(self, conn, msg, state):
            if (msg.get("Action") or "").lower() == "ping" and self.connections == 1:
                with self._lock:
                    self.actions.append(dict(msg))
                return True  # swallowed: no Pong
            return FakeAmiServer._answer(self, conn, msg, state)

    with Silent() as server:
        conn = make_connection(server, ping_interval=1.0)
        with caplog.at_level(logging.WARNING):
            conn.start()
            try:
                assert conn.connected.wait(5)
                assert wait_for(lambda: server.logins >= 2, 10), "the dead session was not replaced"
                assert any(a.get("Action") == "Ping" for a in server.actions)
                assert "no answer to Ping" in caplog.text
                assert conn.ping().response["Ping"] == "Pong"
            finally:
                conn.stop()


# -- the whole engine over a socket --------------------------------------------------------

class Engine(object):
    """bx24ast.Daemon against a fake server, collecting finished calls."""

    def __init__(self, server, extra=""):
        text = ("[ami]\nhost = 127.0.0.1\nport = %d\nusername = bx24\nsecret = s3cret\n"
                "reconnect_max_delay = 1\nping_interval = 5\n%s" % (server.port, extra))
        self.config = bx24ast.Config.from_text(text)
        self.ended = []
        self.events = []
        self.daemon = bx24ast.Daemon(self.config, self._on_call_event)
        self.thread = threading.Thread(target=self.daemon.run)

    def _on_call_event(self, kind, call, ext):
        self.events.append((kind, call.linkedid, ext))
        if kind == "ended" and bx24ast.is_reportable(call, self.daemon.rules, True):
            self.ended.append(call.as_dict(self.daemon.rules.number_plan))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.daemon.stop()
        self.thread.join(10)

    def wait_done(self, server, count, timeout=30):
        assert wait_for(lambda: server.finished.is_set() and len(self.ended) >= count
                     and not self.daemon.tracker.calls, timeout), \
            (server.finished.is_set(), len(self.ended), count, list(self.daemon.tracker.calls))


def _expected(names, base=PJSIP):
    plan = bx24ast.NumberPlan()
    rows = {}
    for name in names:
        for call in load_expected(os.path.join(base, name))["calls"]:
            rows[call["linkedid"]] = expected_row(call, plan)
    return rows


def _compare(got, expected, keys=("direction", "external_number", "did", "rang", "answered_by",
                                  "ended_with", "transfers", "disposition", "recording")):
    by_id = {}
    for row in got:
        assert row["linkedid"] not in by_id, "call reported twice: %s" % row["linkedid"]
        by_id[row["linkedid"]] = row
    assert sorted(by_id) == sorted(expected)
    for linkedid, want in expected.items():
        for key in keys:
            assert by_id[linkedid][key] == want[key], (linkedid, key, by_id[linkedid][key], want[key])


@pytest.mark.parametrize("base", [PJSIP, LOCAL], ids=["pjsip", "local"])
def test_every_capture_over_a_socket_in_random_chunks(base):
    paths = [os.path.join(base, s) for s in SCENARIOS]
    with FakeAmiServer(paths, seed=3) as server:
        with Engine(server) as engine:
            expected = _expected(SCENARIOS, base)
            engine.wait_done(server, len(expected))
            _compare(engine.ended, expected)
            assert engine.daemon.resyncs == 1


def test_connection_dropped_mid_call_reconnects_and_resynchronises():
    paths = [os.path.join(PJSIP, s) for s in SCENARIOS]
    # drop in the middle of the concurrent burst, with nothing lost
    with FakeAmiServer(paths, drop_after=700, seed=5) as server:
        with Engine(server) as engine:
            expected = _expected(SCENARIOS)
            engine.wait_done(server, len(expected))
            assert server.dropped and server.logins == 2 and engine.daemon.resyncs == 2
            _compare(engine.ended, expected)


def test_events_lost_during_an_outage_do_not_lose_calls():
    paths = [os.path.join(PJSIP, s) for s in SCENARIOS]
    with FakeAmiServer(paths, drop_after=700, gap=40, seed=9) as server:
        with Engine(server) as engine:
            expected = _expected(SCENARIOS)
            engine.wait_done(server, len(expected))
            got = {r["linkedid"]: r for r in engine.ended}
            assert sorted(got) == sorted(expected), "a call was lost or invented"
            for linkedid, want in expected.items():
                for key in ("direction", "external_number", "did"):
                    assert got[linkedid][key] == want[key]


def test_asterisk_restart_mid_call_closes_the_call_and_goes_on():
    names = ["inbound_answered", "outbound_answered"]
    paths = [os.path.join(PJSIP, s) for s in names]
    # restart while inbound_answered is talking (after its first BridgeEnter)
    msgs = __import__("fake_ami").capture_messages(paths[0])
    cut = [i for i, (raw, _) in enumerate(msgs) if raw.startswith(b"Event: BridgeEnter")][-1] + 2
    with FakeAmiServer(paths, restart_after=cut, seed=11) as server:
        with Engine(server) as engine:
            engine.wait_done(server, 2)
            got = {r["linkedid"]: r for r in engine.ended}
            first = got["1795667003.0"]
            assert first["disposition"] == "ANSWERED" and first["answered_by"] == "102"
            _compare([got["1795667032.8"]], _expected(["outbound_answered"]))


def test_garbage_in_the_stream_does_not_break_calls():
    paths = [os.path.join(PJSIP, s) for s in ("inbound_answered", "blind_transfer")]
    garbage = (b"\x00\x01\x02 not ami\r\n\r\nEvent: Broken\r\n" + b"Z" * 2000000 + b"\r\n\r\n"
               b"Event: VarSet\r\nVariable: X\r\nEvent: Glued\r\nUniqueid: 1\r\n\r\n")
    with FakeAmiServer(paths, garbage_at=40, garbage=garbage, seed=13, max_chunk=9000) as server:
        with Engine(server, "max_message_bytes = 1048576\n") as engine:
            expected = _expected(["inbound_answered", "blind_transfer"])
            engine.wait_done(server, 2)
            _compare(engine.ended, expected)
            assert engine.daemon.ami.parser.skipped_oversize == 1


def test_real_timing_gives_real_talk_time():
    path = os.path.join(PJSIP, "inbound_answered")
    with FakeAmiServer([path], speed=2.0, seed=17) as server:
        with Engine(server) as engine:
            engine.wait_done(server, 1, timeout=20)
            [row] = engine.ended
            assert abs(row["billsec"] - 5.0 / 2.0) <= 1
            kinds = [k for k, _, _ in engine.events]
            assert kinds[:3] == ["ringing", "ringing", "answered"] and kinds[-1] == "ended"


def test_events_in_the_same_read_as_the_login_answer_are_kept():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = []

    def serve():
        c, _ = srv.accept()
        c.sendall(b"Asterisk Call Manager/11.0.0\r\n")
        parser = bx24ast.AmiParser(accept_actions=True)
        parser.reset(expect_banner=False)
        msgs = []
        while not msgs:
            msgs = parser.feed(c.recv(4096))
        c.sendall(("Response: Success\r\nActionID: %s\r\nMessage: Authentication accepted\r\n\r\n"
                   % msgs[0]["ActionID"]).encode()
                  + b"Event: Newchannel\r\nUniqueid: 1.1\r\nLinkedid: 1.1\r\n\r\n"
                  + b"Event: Hangup\r\nUniqueid: 1.1\r\nLinkedid: 1.1\r\n\r\n")
        time.sleep(0.5)
        c.close()
    t = threading.Thread(target=serve)
    t.start()
    conn = bx24ast.AmiConnection("127.0.0.1", srv.getsockname()[1], "u", "s", got.append)
    conn.start()
    try:
        assert wait_for(lambda: len(got) == 2, 5)
        assert [m.name for m in got] == ["Newchannel", "Hangup"]
    finally:
        conn.stop()
        t.join()
        srv.close()


def test_a_repeated_header_takes_its_last_value_and_breaks_no_handler():
    """A torn/spliced message repeats headers Asterisk sends once: the last value wins
    (lists only where Asterisk itself repeats, like ChanVariable and Output)."""
    raw = (b"Event: Newchannel\r\nChannel: PJSIP/trunk-000001\r\nChannel: PJSIP/trunk-000002\r\n"
           b"ChannelState: 4\r\nCallerIDNum: +79161234567\r\nCallerIDNum: 89161234567\r\n"
           b"Context: from-trunk\r\nExten: 74951234567\r\nUniqueid: 9.1\r\nLinkedid: 9.1\r\n"
           b"ChanVariable: A=1\r\nChanVariable: B=2\r\n\r\n")
    parser = bx24ast.AmiParser()
    parser.feed(b"Asterisk Call Manager/11.0.0\r\n")
    (msg,) = parser.feed(raw, 1.0)
    assert msg.get("Channel") == "PJSIP/trunk-000002" and msg.get("CallerIDNum") == "89161234567"
    assert msg.get("ChanVariable") == ["A=1", "B=2"]
    seen = []
    tracker = bx24ast.CallTracker(bx24ast.PbxRules.defaults(), lambda k, c, e: seen.append(k))
    tracker.handle(msg)
    assert tracker.channels["9.1"].origin == "trunk"
    assert tracker.calls["9.1"].external_number == "89161234567"
