#!/usr/bin/env python3
"""How fast calls reach Bitrix24 under the portal's rate limit.

A burst of K simultaneous inbound calls (K = 10, 50, 200) goes through the real
Bitrix24 side of bx24ast (CrmFlows -> sqlite outbox -> OutboxSender -> HTTP) to
the test emulator limited to 2 requests/s with a 50-request bucket. Printed per
K: the time until the last card is requested (register received by the portal)
and until the last call is finished, beside the theoretical minimum for that
limit; and how many 503s the portal answered (must be 0). Then the latency of a
single call's card with no backlog: AMI event handled -> register received, p50
and p99 over 40 calls placed 1.2 s apart (under the limit, so no backlog).

Usage: python3 bench/bench_crm.py
"""
import math
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import bx24ast  # noqa: E402
from b24_emulator import Bitrix24Emulator  # noqa: E402
from test_calls import Pbx  # noqa: E402

RATE, BURST = 2.0, 50


def bridge_for(emu):
    """bx24ast's Bitrix24 side, started, and a PBX that feeds it call events."""
    config = bx24ast.Config.from_text(
        "[bitrix24]\nwebhook_url = %s\nrate = %s\nburst = %s\n[storage]\nstate_dir = %s\n"
        "[crm]\nmissed_task = no\n[recordings]\nattach = no\n[cel]\nbackend = off\n"
        % (emu.webhook_url, RATE, BURST, tempfile.mkdtemp(prefix="bench-crm-")))
    rules = bx24ast.PbxRules.from_config(config)
    bridge = bx24ast.Bridge(config, rules)
    bridge.users.refresh()
    bridge.start()
    pbx = Pbx(rules, base=time.time())
    pbx.tracker = bx24ast.CallTracker(rules, bridge.crm.on_call_event)
    return bridge, pbx


def requests_needed(commands, per_request=50):
    return int(math.ceil(commands / float(per_request)))


def minimum_seconds(requests):
    """Time the leaky bucket needs for that many requests, starting empty."""
    extra = max(0, requests - BURST)
    return extra / RATE


def run_burst(k):
    with Bitrix24Emulator(rate=RATE, burst=BURST) as emu:
        bridge, pbx = bridge_for(emu)
        t0 = time.time()
        for i in range(k):
            n = 5000 + i
            lid = "%d.1" % n
            ext = ("101", "102", "103")[i % 3]
            pbx.new(lid, "PJSIP/trunk-%08x" % (2 * n), lid, "from-trunk", "74951234567", "+7916%07d" % i, 4)
            pbx.new(lid + "9", "PJSIP/%s-%08x" % (ext, 2 * n + 1), lid)
            pbx.dial(lid, lid + "9", ext)
        while len([e for e in emu.journal if e["method"] == "telephony.externalcall.register"
                   and e.get("status") == 200]) < k:
            time.sleep(0.005)
        cards = time.time() - t0
        t1 = time.time()
        for i in range(k):
            n = 5000 + i
            lid = "%d.1" % n
            pbx.t = time.time()
            pbx.dialend(lid, lid + "9", "ANSWER")
            pbx.enter(lid + "9", "B%d" % n)
            pbx.enter(lid, "B%d" % n)
            pbx.t += 30
            pbx.hangup(lid + "9")
            pbx.hangup(lid)
        while len(emu.stats) < k:
            time.sleep(0.005)
        finished = time.time() - t0
        http = len([e for e in emu.journal if not e.get("in_batch")])
        bridge.stop()
        # minimum: registers (K) then finishes (K), 50 commands a request
        need_cards = requests_needed(k)
        need_all = need_cards + requests_needed(k)
        return cards, finished, need_cards, need_all, http, emu.rejected_503


def card_latency(n=40, spacing=1.2):
    """Each call is answered and ended (register + finish: 2 requests), one every
    `spacing` seconds: 1.7 requests/s, under the 2/s limit, so no backlog forms."""
    with Bitrix24Emulator(rate=RATE, burst=BURST) as emu:
        bridge, pbx = bridge_for(emu)
        lat = []
        for i in range(n):
            num = 9000 + i
            lid = "%d.1" % num
            pbx.t = time.time()
            pbx.new(lid, "PJSIP/trunk-%08x" % (2 * num), lid, "from-trunk", "74951234567", "+7926%07d" % i, 4)
            pbx.new(lid + "9", "PJSIP/101-%08x" % (2 * num + 1), lid)
            t0 = time.time()
            pbx.dial(lid, lid + "9", "101")
            while True:
                hits = [e for e in emu.journal if e["method"] == "telephony.externalcall.register"
                        and e["params"].get("EXTERNAL_CALL_ID") == lid]
                if hits:
                    lat.append(hits[0]["t"] - t0)
                    break
                time.sleep(0.0005)
            pbx.t = time.time()
            pbx.dialend(lid, lid + "9", "ANSWER")
            pbx.enter(lid + "9", "B%d" % num)
            pbx.enter(lid, "B%d" % num)
            pbx.t += 10
            pbx.hangup(lid + "9")
            pbx.hangup(lid)
            time.sleep(max(0.0, spacing - (time.time() - t0)))
        bridge.stop()
        lat.sort()
        return lat[len(lat) // 2], lat[max(0, int(math.ceil(len(lat) * 0.99)) - 1)], lat[-1]


def main():
    print("Python %s; portal limit %.0f req/s, bucket %d" % (sys.version.split()[0], RATE, BURST))
    for k in (10, 50, 200):
        cards, finished, need_cards, need_all, http, rejected = run_burst(k)
        print("K=%3d: last card requested after %.2f s (minimum: %d requests, %.2f s); "
              "all finished after %.2f s (minimum: %d requests, %.2f s); %d HTTP requests; %d x 503"
              % (k, cards, need_cards, minimum_seconds(need_cards), finished, need_all,
                 minimum_seconds(need_all), http, rejected))
    p50, p99, worst = card_latency()
    print("card latency with no backlog (AMI event -> register at the portal): p50 %.1f ms, p99 %.1f ms, "
          "max %.1f ms" % (p50 * 1000, p99 * 1000, worst * 1000))


if __name__ == "__main__":
    main()
