#!/usr/bin/env python3
"""Throughput and memory of the AMI framing and the full call engine.

Builds a long stream from the real captures in tests/fixtures (thousands of
interleaved calls, linkedids/uniqueids remapped so every copy is a new call,
with everything a live PBX sends: RTCP, Newexten, unrelated VarSet, device
state...) and prints, in one run:

  framing   bytes -> AMI messages, every message parsed (the ceiling)
  engine    socket -> messages -> calls, the way `bx24ast.py run` does it,
            through a real loopback socket read by AmiConnection's code path
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
    return len(set(re.findall(rb"\r\nLinkedid: ([^\r]+)", b"\r\n" + b"\r\n\r\n".join(block))))


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
    rates = []
    for _ in range(args.repeat):
        ended, left, dt = bench_engine(data, events)
        assert ended == calls and left == 0, "the engine lost calls"
        rates.append(events / dt)
    report("full engine  ", rates, " (%d calls each, none lost)" % calls)

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
