#!/usr/bin/env python3
"""Card and finish latency under a steady stream of calls, bucket never full.

1,000 inbound calls spread over 10 minutes (Poisson arrivals, a random ring of 2-8 s,
answered, 10-60 s of talk) go through the real Bitrix24 side of bx24ast (CrmFlows ->
sqlite outbox -> OutboxSender -> HTTP) to the test emulator at the portal's limit:
2 requests/s, a bucket of 50. Printed per run: card latency (AMI DialBegin handled ->
telephony.externalcall.register at the portal) and finish latency (the caller's Hangup
-> telephony.externalcall.finish at the portal), p50 and p99; the HTTP requests the
portal saw and its 503 answers. Runs repeat (--runs) and the best and median are
printed, with the machine's calibration figure (a fixed loop, in ms) of each run.

Usage: python3 bench/bench_latency.py [--calls 1000] [--seconds 600] [--runs 5]
"""
import argparse
import heapq
import math
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from b24_emulator import Bitrix24Emulator  # noqa: E402
from bench_crm import RATE, BURST, bridge_for  # noqa: E402


def calibration():
    """Milliseconds of a fixed pure-Python loop: how fast this machine is right now."""
    t0 = time.perf_counter()
    total = 0
    for i in range(300000):
        total += i % 7
    return (time.perf_counter() - t0) * 1000


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[max(0, int(math.ceil(len(values) * q)) - 1)]


def schedule(calls, seconds, seed):
    """[(time, what, call number)] of the whole stream, in time order."""
    rng = random.Random(seed)
    events, t = [], 0.0
    for n in range(calls):
        t += rng.expovariate(calls / float(seconds))
        ring = rng.uniform(2, 8)
        talk = rng.uniform(10, 60)
        events += [(t, 0, "ring", n), (t + ring, 1, "answer", n), (t + ring + talk, 2, "hangup", n)]
    heapq.heapify(events)
    return events


def run(calls, seconds, seed):
    with Bitrix24Emulator(rate=RATE, burst=BURST) as emu:
        bridge, pbx = bridge_for(emu)
        events = schedule(calls, seconds, seed)
        rang, hung = {}, {}
        start = time.time()
        while events:
            at, _order, what, n = heapq.heappop(events)
            delay = start + at - time.time()
            if delay > 0:
                time.sleep(delay)
            lid = "%d.1" % (7000000 + n)
            ext = ("101", "102", "103")[n % 3]
            pbx.t = time.time()
            if what == "ring":
                pbx.new(lid, "PJSIP/trunk-%08x" % (2 * n), lid, "from-trunk", "74951234567", "+7916%07d" % n, 4)
                pbx.new(lid + "9", "PJSIP/%s-%08x" % (ext, 2 * n + 1), lid)
                rang[lid] = time.time()
                pbx.dial(lid, lid + "9", ext)
            elif what == "answer":
                pbx.dialend(lid, lid + "9", "ANSWER")
                pbx.enter(lid + "9", "B%d" % n)
                pbx.enter(lid, "B%d" % n)
            else:
                pbx.hangup(lid + "9")
                hung[lid] = time.time()
                pbx.hangup(lid)
        deadline = time.time() + 120
        while len(emu.stats) < calls and time.time() < deadline:
            time.sleep(0.05)
        bridge.stop()
        cards, finishes = {}, {}
        by_call = dict((cid, record["EXTERNAL_CALL_ID"]) for cid, record in emu.stats.items())
        for e in emu.journal:
            params = e.get("params") or {}
            if e["method"] == "telephony.externalcall.register" and e.get("status", 200) == 200:
                cards.setdefault(params.get("EXTERNAL_CALL_ID"), e["t"])
            elif e["method"] == "telephony.externalcall.finish":
                lid = by_call.get(params.get("CALL_ID"))
                if lid:
                    finishes.setdefault(lid, e["t"])
        card = [cards[lid] - t for lid, t in rang.items() if lid in cards]
        finish = [finishes[lid] - t for lid, t in hung.items() if lid in finishes]
        http = len([e for e in emu.journal if not e.get("in_batch")])
        return {"card": card, "finish": finish, "http": http, "503": emu.rejected_503,
                "reported": len(emu.stats), "calls": calls}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print("Python %s; %d calls over %.0f s; portal %.0f req/s, bucket %d"
          % (sys.version.split()[0], args.calls, args.seconds, RATE, BURST))
    rows = []
    for i in range(args.runs):
        cal = calibration()
        r = run(args.calls, args.seconds, seed=i + 1)
        row = (percentile(r["card"], .5), percentile(r["card"], .99), percentile(r["finish"], .5),
               percentile(r["finish"], .99))
        rows.append(row)
        print("run %d (calibration %.0f ms): card p50 %.3f s p99 %.3f s; finish p50 %.3f s p99 %.3f s; "
              "%d HTTP requests, %d x 503, %d/%d calls reported"
              % ((i + 1, cal) + row + (r["http"], r["503"], r["reported"], r["calls"])))
    for label, pick in (("best", min), ("median", lambda xs: sorted(xs)[len(xs) // 2])):
        print("%s: card p50 %.3f s p99 %.3f s; finish p50 %.3f s p99 %.3f s"
              % ((label,) + tuple(pick([r[k] for r in rows]) for k in range(4))))


if __name__ == "__main__":
    main()
