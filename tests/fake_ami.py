"""A fake Asterisk Manager Interface that serves a real capture over loopback.

It speaks enough AMI for bx24ast: the banner, Login (plain and MD5), Ping,
CoreShowChannels (answered from the channels the served events describe),
Originate, Setvar, Command, Logoff. The capture's events are written in random
chunk sizes, optionally with the capture's real timing, and the server can drop
the connection mid-call, lose the events of the outage, restart like Asterisk
does, or insert garbage. Everything binds to 127.0.0.1 on an ephemeral port and
stop() ends every thread and socket it started.
"""
import hashlib
import json
import os
import random
import socket
import threading
import time

import bx24ast

BANNER = b"Asterisk Call Manager/11.0.0\r\n"


def capture_messages(path):
    """The capture's events (after the login answer), each as raw bytes with its time."""
    capture = bx24ast.Capture(path)
    data = capture.read()
    times = []
    if capture.sidecar_path:
        with open(capture.sidecar_path) as f:
            times = [json.loads(line) for line in f if line.strip()]
    msgs = []
    pos = data.index(b"\r\n") + 2  # the banner
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        raw = data[pos:end + 4]
        if raw.startswith(b"Event: ") and not raw.startswith((b"Event: SuccessfulAuth",
                                                               b"Event: FullyBooted")):
            t = 0.0
            for rec in times:
                if rec["offset"] + rec["len"] > end:
                    t = rec["t"]
                    break
            msgs.append((raw, t))
        pos = end + 4
    return msgs


class ChannelTable(object):
    """What CoreShowChannels would answer after the events served so far."""

    def __init__(self):
        self.channels = {}
        self.parser = bx24ast.AmiParser()
        self.parser.reset(expect_banner=False)

    def apply(self, raw):
        for msg in self.parser.feed(raw):
            uid = msg.get("Uniqueid")
            name = msg.name
            if name == "Newchannel":
                self.channels[uid] = {"Channel": msg.get("Channel"), "Uniqueid": uid,
                                      "Linkedid": msg.get("Linkedid"), "Context": msg.get("Context"),
                                      "Exten": msg.get("Exten"), "CallerIDNum": msg.get("CallerIDNum"),
                                      "ChannelState": msg.get("ChannelState"), "BridgeId": "",
                                      "since": time.time()}
            elif uid in self.channels:
                chan = self.channels[uid]
                if name == "Hangup":
                    del self.channels[uid]
                elif name == "BridgeEnter":
                    chan["BridgeId"] = msg.get("BridgeUniqueid")
                elif name == "BridgeLeave":
                    chan["BridgeId"] = ""
                elif name in ("Newstate", "NewCallerid"):
                    chan["ChannelState"] = msg.get("ChannelState")
                    chan["CallerIDNum"] = msg.get("CallerIDNum")
                if name != "Hangup" and msg.get("Linkedid"):
                    chan["Linkedid"] = msg.get("Linkedid")


class FakeAmiServer(object):
    def __init__(self, captures=(), username="bx24", secret="s3cret", speed=None,
                 drop_after=None, gap=0, restart_after=None, garbage_at=None, garbage=b"",
                 seed=1, max_chunk=1500, pause_at=None, on_originate=None, extension_states=None,
                 lists=None, refuse=()):
        self.messages = []
        for path in captures:
            self.messages.extend(capture_messages(path))
        self.username = username
        self.secret = secret
        self.speed = speed
        self.drop_after = drop_after
        self.gap = gap
        self.restart_after = restart_after
        self.garbage_at = garbage_at
        self.garbage = garbage
        self.rng = random.Random(seed)
        self.max_chunk = max_chunk
        self.pause_at = pause_at     # stop streaming there until the next connection
        # on_originate: a capture played when an Originate arrives, as Asterisk would,
        # carrying the Originate's variables and ActionID (nothing streams before).
        self.on_originate = capture_messages(on_originate) if on_originate else None
        if self.on_originate is not None:
            self.pause_at = 0
        self.extension_states = dict(extension_states or {})   # extension -> Status
        # list actions answered with these events (PBX discovery); refused ones: no rights
        self.lists = dict((k.lower(), v) for k, v in (lists or {}).items())
        self.refuse = set(a.lower() for a in refuse)
        self.cursor = 0
        self.table = ChannelTable()
        self.actions = []          # every action received, as dicts
        self.connections = 0
        self.logins = 0
        self.dropped = False
        self.paused = False
        self.restarted = False
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []
        self._socks = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]

    # -- lifecycle ------------------------------------------------------------------
    def start(self):
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self):
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        for s in list(self._socks):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _accept_loop(self):
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._socks.append(conn)
            t = threading.Thread(target=self._session, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    # -- one AMI session ------------------------------------------------------------
    def _send(self, conn, data):
        """Write in random chunk sizes so that messages split across reads."""
        view = memoryview(data)
        while view:
            n = self.rng.randint(1, self.max_chunk)
            conn.sendall(view[:n])
            view = view[n:]

    def _session(self, conn):
        with self._lock:
            self.connections += 1
            number = self.connections
            if number > 1:
                self.pause_at = None
        parser = bx24ast.AmiParser(accept_actions=True)
        parser.reset(expect_banner=False)
        state = {"events": False, "logged_in": False, "challenge": None}
        try:
            conn.sendall(BANNER)
            conn.settimeout(0.05)
            if number > 1 and self.restarted:
                pass
            streaming_started = None
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                    if not data:
                        return
                    for msg in parser.feed(data):
                        if not self._answer(conn, msg, state):
                            return
                except socket.timeout:
                    pass
                if state["logged_in"] and state["events"]:
                    if streaming_started is None:
                        streaming_started = time.time()
                        uptime = b"0" if self.restarted else b"12345"
                        self._send(conn, b"Event: FullyBooted\r\nPrivilege: system,all\r\nUptime: "
                                   + uptime + b"\r\nLastReload: 0\r\nStatus: Fully Booted\r\n\r\n")
                    if not self._stream_some(conn, streaming_started):
                        return
        except OSError:
            return
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _stream_some(self, conn, started):
        """Serve due events; False when this connection must be dropped."""
        sent = 0
        while self.cursor < len(self.messages) and sent < 200:
            if self.pause_at is not None and self.cursor >= self.pause_at:
                self.paused = True
                return True
            raw, t = self.messages[self.cursor]
            if self.speed:
                first_t = self.messages[0][1]
                due = started + (t - first_t) / self.speed
                if time.time() < due:
                    return True
            if self.drop_after is not None and self.cursor == self.drop_after and not self.dropped:
                self.dropped = True
                # The events of the outage are lost, but they happened.
                for _ in range(self.gap):
                    if self.cursor < len(self.messages):
                        self.table.apply(self.messages[self.cursor][0])
                        self.cursor += 1
                conn.shutdown(socket.SHUT_RDWR)
                return False
            if self.restart_after is not None and self.cursor == self.restart_after and not self.restarted:
                self.restarted = True
                self._send(conn, b"Event: Shutdown\r\nPrivilege: system,all\r\nShutdown: Cleanly\r\n"
                                 b"Restart: True\r\n\r\n")
                # A restart hangs up every channel; the rest of that capture never happens.
                self.table.channels.clear()
                self.cursor = self._next_capture_start(self.cursor)
                conn.shutdown(socket.SHUT_RDWR)
                return False
            if self.garbage_at is not None and self.cursor == self.garbage_at:
                self.garbage_at = None
                self._send(conn, self.garbage)
            self.table.apply(raw)
            self._send(conn, raw)
            self.cursor += 1
            sent += 1
        if self.cursor >= len(self.messages):
            self.finished.set()
        return True

    def _next_capture_start(self, index):
        """Skip to the first Newchannel whose linkedid was not seen before index."""
        seen = set()
        for raw, _ in self.messages[:index]:
            for line in raw.split(b"\r\n"):
                if line.startswith(b"Linkedid: "):
                    seen.add(line)
        for i in range(index, len(self.messages)):
            raw = self.messages[i][0]
            if raw.startswith(b"Event: Newchannel") and not any(
                    line in seen for line in raw.split(b"\r\n") if line.startswith(b"Linkedid: ")):
                return i
        return len(self.messages)

    def _play_originated(self, msg, action_id):
        """Queue the originate capture: the Originate's Variable headers appear as VarSet
        on the first channel (inheritable ones keep their __ prefix, as Asterisk shows)."""
        messages, self.on_originate = self.on_originate, None
        variables = msg.get("Variable") or []
        variables = [variables] if isinstance(variables, str) else variables
        out = []
        for raw, t in messages:
            raw = raw.replace(b"ActionID: c2c-0001", b"ActionID: " + action_id.encode())
            out.append((raw, t))
            if raw.startswith(b"Event: Newchannel") and variables:
                fields = dict(line.split(b": ", 1) for line in raw.split(b"\r\n")[1:] if b": " in line)
                for item in variables:
                    name, _, value = item.partition("=")
                    out.append((b"Event: VarSet\r\nPrivilege: dialplan,all\r\nChannel: %s\r\nUniqueid: %s\r\n"
                                b"Linkedid: %s\r\nVariable: %s\r\nValue: %s\r\n\r\n"
                                % (fields[b"Channel"], fields[b"Uniqueid"], fields[b"Linkedid"], name.encode(),
                                   value.encode()), t))
                variables = []
        with self._lock:
            self.messages[self.cursor:self.cursor] = out
            self.pause_at = None

    def _reply(self, conn, action_id, response="Success", message=None, extra=()):
        lines = ["Response: %s" % response, "ActionID: %s" % action_id]
        if message:
            lines.append("Message: %s" % message)
        lines.extend("%s: %s" % kv for kv in extra)
        self._send(conn, ("\r\n".join(lines) + "\r\n\r\n").encode())

    def _answer(self, conn, msg, state):
        action = (msg.get("Action") or "").lower()
        action_id = msg.get("ActionID") or ""
        with self._lock:
            self.actions.append(dict(msg))
        if action == "challenge":
            state["challenge"] = "%08d" % self.rng.randint(0, 10 ** 8 - 1)
            self._reply(conn, action_id, extra=[("Challenge", state["challenge"])])
        elif action == "login":
            ok = msg.get("Username") == self.username
            if msg.get("AuthType", "").lower() == "md5":
                want = hashlib.md5(((state["challenge"] or "") + self.secret).encode()).hexdigest()
                ok = ok and msg.get("Key") == want
            else:
                ok = ok and msg.get("Secret") == self.secret
            if not ok:
                self._reply(conn, action_id, "Error", "Authentication failed")
                return True
            state["logged_in"] = True
            state["events"] = (msg.get("Events") or "on").lower() != "off"
            with self._lock:
                self.logins += 1
            self._reply(conn, action_id, message="Authentication accepted")
        elif not state["logged_in"]:
            self._reply(conn, action_id, "Error", "Permission denied")
        elif action == "ping":
            self._reply(conn, action_id, extra=[("Ping", "Pong"), ("Timestamp", "%.6f" % time.time())])
        elif action == "coreshowchannels":
            self._reply(conn, action_id, message="Channels will follow", extra=[("EventList", "start")])
            items = list(self.table.channels.values())
            for chan in items:
                secs = int(time.time() - chan["since"])
                fields = [("Event", "CoreShowChannel"), ("ActionID", action_id)]
                fields += [(k, chan[k] or "") for k in ("Channel", "Uniqueid", "Linkedid", "Context",
                                                        "Exten", "CallerIDNum", "ChannelState", "BridgeId")]
                fields.append(("Duration", "%02d:%02d:%02d" % (secs // 3600, secs // 60 % 60, secs % 60)))
                self._send(conn, ("\r\n".join("%s: %s" % kv for kv in fields) + "\r\n\r\n").encode())
            self._send(conn, ("Event: CoreShowChannelsComplete\r\nActionID: %s\r\nEventList: Complete\r\n"
                              "ListItems: %d\r\n\r\n" % (action_id, len(items))).encode())
        elif action == "originate":
            self._reply(conn, action_id, message="Originate successfully queued")
            if self.on_originate is not None:
                self._play_originated(msg, action_id)
        elif action == "extensionstate":
            status = self.extension_states.get(msg.get("Exten"), "-1")
            self._reply(conn, action_id, message="Extension Status", extra=[
                ("Exten", msg.get("Exten") or ""), ("Context", msg.get("Context") or ""),
                ("Hint", "PJSIP/%s" % msg.get("Exten") if status != "-1" else ""), ("Status", status),
                ("StatusText", {"0": "Idle", "4": "Unavailable", "1": "InUse"}.get(status, "Unknown"))])
        elif action in self.refuse:
            self._reply(conn, action_id, "Error", "Permission denied")
        elif action in self.lists:
            self._reply(conn, action_id, message="A listing follows", extra=[("EventList", "start")])
            items = self.lists[action]
            for item in items:
                fields = [("Event", item.name), ("ActionID", action_id)] + list(item.items())
                self._send(conn, ("\r\n".join("%s: %s" % kv for kv in fields) + "\r\n\r\n").encode())
            self._send(conn, ("Event: %sComplete\r\nActionID: %s\r\nEventList: Complete\r\n"
                              "ListItems: %d\r\n\r\n" % (items[0].name if items else "List", action_id,
                                                            len(items))).encode())
        elif action == "setvar":
            self._reply(conn, action_id, message="Variable Set")
        elif action == "command":
            self._reply(conn, action_id, message="Command output follows",
                        extra=[("Output", "Asterisk 22.10.1 built by fake"), ("Output", "second line")])
        elif action == "logoff":
            self._reply(conn, action_id, "Goodbye", "Thanks for all the fish.")
            return False
        else:
            self._reply(conn, action_id, "Error", "Invalid/unknown command")
        return True
