#!/usr/bin/env python3
"""Throughput and memory of the AMI framing and the full call engine.

Builds a long stream from the real captures in tests/fixtures (thousands of
interleaved calls, linkedids/uniqueids remapped so every copy is a new call,
with everything a live PBX sends: RTCP, Newexten, unrelated VarSet, device
state...) and prints, in one run:

  framing   bytes -> AMI messages, every message parsed
  ceiling   the pure-Python ceiling: unneeded events dropped on raw bytes, a dict
            of every header for the rest, no tracking
  engine    messages -> calls from memory, and socket -> messages -> calls the way
            `bx24ast.py run` does it, through a real loopback socket read by
            AmiConnection's code path; each as a ratio to the ceiling of the same round
  memory    peak RSS, and RSS growth after 100,000 calls

Usage: python3 bench/bench_engine.py [--calls 100000]
"""
import argparse
import gc
import glob
import os
import re
import resource
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import bx24ast  # noqa: E402


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def capture_calls():
    """The event part of every capture (without banner, login and logoff)."""
    blocks = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "asterisk-*", "*", "ami.log"))):
        data = open(path, "rb").read()
        msgs = data.split(b"\r\n\r\n")
        body = [m for m in msgs[1:] if m.startswith(b"Event: ")
                and not m.startswith((b"Event: FullyBooted", b"Event: SuccessfulAuth"))]
        blocks.append(body)
    return blocks


_ID = re.compile(rb"(\d{10})\.(\d+)")
_CHAN = re.compile(rb"-([0-9a-f]{8})(;[12])?")


def remap(msgs, n):
    """A copy of a capture's messages as call number n: new uniqueids, channels, bridges."""
    shift = n * 1000

    def uid(m):
        return b"%d.%d" % (int(m.group(1)) + shift, int(m.group(2)))

    def chan(m):
        return b"-%08x%s" % ((int(m.group(1), 16) + shift * 7) & 0xFFFFFFFF, m.group(2) or b"")
    out = []
    for msg in msgs:
        msg = _ID.sub(uid, msg)
        msg = _CHAN.sub(chan, msg)
        msg = msg.replace(b"BridgeUniqueid: ", b"BridgeUniqueid: %d-" % n)
        out.append(msg)
    return out


def count_calls(block):
    """The calls the engine ends for one copy of a capture, on its own (a pickup or a
    parked call joins two Linkedids into one call: counting Linkedids says 2)."""
    ended = []
    tracker = bx24ast.CallTracker(bx24ast.PbxRules.defaults(), lambda kind, call, ext: ended.append(kind))
    parser = bx24ast.AmiParser(1 << 20)
    parser.reset(expect_banner=False)
    bx24ast.AmiStream(tracker.handle, parser).feed(b"\r\n\r\n".join(block) + b"\r\n\r\n", 1000.0)
    return ended.count("ended")


def build_stream(target_calls):
    """Copies of every capture, remapped, interleaved 8 at a time message by message."""
    blocks = capture_calls()
    per_round = sum(count_calls(b) for b in blocks)
    chunks = []
    calls = events = n = 0
    width = 8
    while calls < target_calls:
        group = []
        for block in blocks:
            group.append(remap(block, n))
            n += 1
        for i in range(0, len(group), width):
            lanes = group[i:i + width]
            for j in range(max(len(l) for l in lanes)):
                for lane in lanes:
                    if j < len(lane):
                        chunks.append(lane[j])
                        events += 1
        calls += per_round
    data = b"\r\n\r\n".join(chunks) + b"\r\n\r\n"
    return b"Asterisk Call Manager/11.0.0\r\n" + data, events, calls


def bench_framing(data, events, parse_all=False):
    """parse_all=False: cut into messages and read each Event: line only (the ceiling
    of the engine); True: also decode every header of every message."""
    parser = bx24ast.AmiParser(max_message_bytes=1 << 20,
                               wanted_events=None if parse_all else frozenset())
    t0 = time.perf_counter()
    count = 0
    for i in range(0, len(data), 65536):
        count += len(parser.feed(data[i:i + 65536]))
    dt = time.perf_counter() - t0
    return count + parser.filtered, dt


def ceiling(data, wanted, variables):
    """The pure-Python ceiling of the engine: cut the stream, drop the events it ignores
    on their raw bytes (the Event: line, a VarSet's Variable:), decode the rest into a
    dict of every header; no call tracking at all. Returns the messages kept."""
    kept = 0
    tail = b""
    for i in range(0, len(data), 65536):
        parts = (tail + data[i:i + 65536]).split(b"\r\n\r\n")
        tail = parts.pop()
        for raw in parts:
            if raw[:7] != b"Event: ":
                continue
            eol = raw.find(b"\r\n")
            name = raw[7:eol]
            if name not in wanted:
                continue
            if name == b"VarSet":
                at = raw.find(b"\r\nVariable: ")
                end = raw.find(b"\r\n", at + 12)
                if raw[at + 12:end if end > 0 else len(raw)] not in variables:
                    continue
            dict(line.split(": ", 1) for line in raw.decode("utf-8", "replace").split("\r\n"))
            kept += 1
    return kept


def bench_ceiling(data):
    tracker = bx24ast.CallTracker(bx24ast.PbxRules.defaults())
    t0 = time.perf_counter()
    ceiling(data, bx24ast.CallTracker.WANTED_EVENTS, tracker.wanted_variables())
    return time.perf_counter() - t0


def bench_in_memory(data):
    """The engine fed from memory (no socket): parse and track."""
    ended = [0]

    def on_call_event(kind, call, ext):
        if kind == "ended":
            ended[0] += 1

    tracker = bx24ast.CallTracker(bx24ast.PbxRules.defaults(), on_call_event)
    parser = bx24ast.AmiParser(1 << 20, bx24ast.CallTracker.WANTED_EVENTS, tracker.wanted_variables())
    stream = bx24ast.AmiStream(tracker.handle, parser)
    t0 = time.perf_counter()
    for i in range(0, len(data), 65536):
        stream.feed(data[i:i + 65536], time.time())
    return ended[0], time.perf_counter() - t0


def bench_parser_only(data):
    """The engine's own parser and stream, every kept event handed to a handler that
    does nothing: what the engine pays before any call is tracked."""
    tracker = bx24ast.CallTracker(bx24ast.PbxRules.defaults())
    parser = bx24ast.AmiParser(1 << 20, bx24ast.CallTracker.WANTED_EVENTS, tracker.wanted_variables())
    stream = bx24ast.AmiStream(lambda msg: None, parser)
    t0 = time.perf_counter()
    for i in range(0, len(data), 65536):
        stream.feed(data[i:i + 65536], time.time())
    return time.perf_counter() - t0


def bench_engine(data, events):
    """Serve the stream on a loopback socket; read it with AmiConnection's reader."""
    ended = [0]

    def on_call_event(kind, call, ext):
        if kind == "ended":
            ended[0] += 1

    rules = bx24ast.PbxRules.defaults()
    tracker = bx24ast.CallTracker(rules, on_call_event)
    parser = bx24ast.AmiParser(1 << 20, bx24ast.CallTracker.WANTED_EVENTS | {b"FullyBooted"},
                               tracker.wanted_variables())
    stream = bx24ast.AmiStream(tracker.handle, parser)
    a, b = socket.socketpair()
    # The sender is another process, as Asterisk is: a thread here would compete
    # with the reader for the GIL and measure that instead.
    pid = os.fork()
    if pid == 0:
        b.close()
        view = memoryview(data)
        for i in range(0, len(data), 65536):
            a.sendall(view[i:i + 65536])
        a.close()
        os._exit(0)
    a.close()
    t0 = time.perf_counter()
    while True:
        chunk = b.recv(65536)
        if not chunk:
            break
        stream.feed(chunk, time.time())
    dt = time.perf_counter() - t0
    os.waitpid(pid, 0)
    b.close()
    return ended[0], len(tracker.calls), dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100000)
    ap.add_argument("--repeat", type=int, default=5,
                    help="runs of each throughput test; best and median are printed (shared machines vary)")
    args = ap.parse_args()
    print("Python %s" % sys.version.split()[0])
    data, events, calls = build_stream(2000)
    print("stream: %d events, %d calls, %.1f MB" % (events, calls, len(data) / 1e6))
    gc.collect()
    def report(label, rates, note=""):
        rates = sorted(rates)
        print("%s: best %9.0f events/s, median %9.0f events/s over %d runs%s"
              % (label, rates[-1], rates[len(rates) // 2], len(rates), note))

    rates = []
    for _ in range(args.repeat):
        count, dt = bench_framing(data, events)
        rates.append(count / dt)
    report("framing only ", rates, " (cut into messages, Event: line read)")
    count, dt = bench_framing(data, events, parse_all=True)
    print("parse all    : %9.0f events/s (every header of every message decoded, once)" % (count / dt))
    # The engine next to its ceiling, interleaved round by round: the ratios come from
    # the same rounds, so a busy neighbour slows both alike.
    rates, memory, ceil, ratios_mem, ratios_sock, parse_ratios, tracking = [], [], [], [], [], [], []
    for _ in range(args.repeat):
        ceiling_dt = bench_ceiling(data)
        parse_dt = bench_parser_only(data)
        ended, memory_dt = bench_in_memory(data)
        assert ended == calls, "the engine lost calls"
        ended, left, dt = bench_engine(data, events)
        assert ended == calls and left == 0, "the engine lost calls"
        ceil.append(events / ceiling_dt)
        memory.append(events / memory_dt)
        rates.append(events / dt)
        ratios_mem.append(ceiling_dt / memory_dt)
        ratios_sock.append(ceiling_dt / dt)
        parse_ratios.append(ceiling_dt / parse_dt)
        tracking.append((memory_dt - parse_dt) / events * 1e6)
    report("ceiling      ", ceil, " (kept events decoded into dicts, nothing tracked)")
    report("engine, memory", memory, " (parse and track, %d calls each)" % calls)
    report("full engine  ", rates, " (from a socket, %d calls each, none lost)" % calls)
    ratios_mem.sort()
    ratios_sock.sort()
    print("engine / ceiling: in memory best %.2f, median %.2f; from a socket best %.2f, median %.2f (target >= 0.9)"
          % (ratios_mem[-1], ratios_mem[len(ratios_mem) // 2], ratios_sock[-1], ratios_sock[len(ratios_sock) // 2]))
    parse_ratios.sort()
    tracking.sort()
    # What bounds the ratio: the ceiling parses and tracks nothing; the engine's parser
    # alone against it, and what tracking the calls adds per event on top.
    print("  where it goes: the engine's parser alone / ceiling best %.2f, median %.2f; tracking the calls "
          "adds %.2f us per event (median), so parse-as-fast-as-the-ceiling + tracking bounds the ratio at %.2f"
          % (parse_ratios[-1], parse_ratios[len(parse_ratios) // 2], tracking[len(tracking) // 2],
             1.0 / (1.0 + tracking[len(tracking) // 2] * sorted(ceil)[len(ceil) // 2] / 1e6)))

    # Memory: push args.calls calls through one engine in slices; RSS must stay flat.
    rules = bx24ast.PbxRules.defaults()
    tracker = bx24ast.CallTracker(rules)
    parser = bx24ast.AmiParser(1 << 20, bx24ast.CallTracker.WANTED_EVENTS, tracker.wanted_variables())
    stream = bx24ast.AmiStream(tracker.handle, parser)
    body = data[len(b"Asterisk Call Manager/11.0.0\r\n"):]
    parser.reset(expect_banner=False)
    done = 0
    rss_start = None
    t0 = time.perf_counter()
    total_events = 0
    while done < args.calls:
        for i in range(0, len(body), 65536):
            stream.feed(body[i:i + 65536], time.time())
        done += calls
        total_events += events
        if rss_start is None:
            gc.collect()
            rss_start = rss_mb()
    gc.collect()
    dt = time.perf_counter() - t0
    # The same uniqueids come back each slice; the engine must have dropped them all.
    print("memory       : %d calls (%d events, %.0f events/s): RSS after first %d calls %.1f MB, "
          "after all %.1f MB (growth %.1f MB), open calls %d, peak RSS %.1f MB"
          % (done, total_events, total_events / dt, calls, rss_start, rss_mb(), rss_mb() - rss_start,
             len(tracker.calls), peak_rss_mb()))


if __name__ == "__main__":
    main()
