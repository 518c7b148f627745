#!/usr/bin/env python3
"""Record the everyday scenarios of tests/live_scenarios.py from a live Asterisk.

    python3 tests/live/record_scenarios.py 22.10.1 [scenario ...]

For each scenario: `bx24ast.py record-ami` captures the AMI stream while the scenario
runs, then its CEL rows, its recordings and its ground truth (from the scenario's
design, with the recording names Asterisk wrote) go to
tests/fixtures/asterisk-VERSION-live/<scenario>/, the layout of the shared captures.
"""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)

from live_asterisk import LiveAsterisk  # noqa: E402
import live_scenarios  # noqa: E402


def cel_rows(pbx, linkedids):
    """The scenario's CEL rows (its calls' Linkedids and every channel that ever had one)."""
    db = sqlite3.connect(pbx.cel_db())
    db.row_factory = sqlite3.Row
    rows = db.execute("SELECT * FROM cel ORDER BY rowid").fetchall()
    wanted = set(linkedids)
    uids = set(r["uniqueid"] for r in rows if r["linkedid"] in wanted)
    wanted |= set(r["linkedid"] for r in rows if r["uniqueid"] in uids)
    return [r for r in rows if r["linkedid"] in wanted or r["uniqueid"] in uids]


def write_cel(path, rows):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE cel (AcctId INTEGER PRIMARY KEY, eventtype,eventtime,cid_name,cid_num,"
               "cid_ani,cid_rdnis,cid_dnid,exten,context,channame,appname,appdata,amaflags,"
               "accountcode,uniqueid,linkedid,peer,userdeftype,extra)")
    columns = ["eventtype", "eventtime", "cid_name", "cid_num", "cid_ani", "cid_rdnis", "cid_dnid",
               "exten", "context", "channame", "appname", "appdata", "amaflags", "accountcode",
               "uniqueid", "linkedid", "peer", "userdeftype", "extra"]
    for i, row in enumerate(rows, 1):
        keys = row.keys()
        db.execute("INSERT INTO cel VALUES (?%s)" % (",?" * len(columns)),
                   [i] + [str(row[c]) if c in keys and row[c] is not None else "" for c in columns])
    db.commit()
    db.close()


def recordings_of(pbx, rows):
    """{uniqueid of the recorded channel: path} of what MixMonitor wrote."""
    found = {}
    for dirpath, _, files in os.walk(pbx.monitor_dir()):
        for name in files:
            found[name] = os.path.join(dirpath, name)
    uid_to_linkedid = dict((r["uniqueid"], r["linkedid"]) for r in rows)
    by_linkedid = {}
    for name, path in found.items():
        uid = name.rsplit("-", 1)[-1].rsplit(".", 1)[0]
        linkedid = uid_to_linkedid.get(uid)
        if linkedid is not None:
            by_linkedid.setdefault(linkedid, []).append((name, path))
    return by_linkedid


def record(pbx, scenario, out):
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "recordings"))
    conf = os.path.join(pbx.dir, "record.conf")
    with open(conf, "w") as f:
        f.write("[ami]\nhost = 127.0.0.1\nport = %d\nusername = test\nsecret = test\n"
                "[storage]\nstate_dir = %s\n" % (pbx.port, pbx.dir))
    rec = subprocess.Popen([sys.executable, os.path.join(ROOT, "bx24ast.py"), "-c", conf, "record-ami",
                            "-o", os.path.join(out, "ami.log")], stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        calls = scenario.run(pbx)
        time.sleep(1.0)
        if not pbx.wait_idle(scenario.seconds + 60):
            raise RuntimeError("%s: calls still up: %s" % (scenario.name, pbx.channels()))
        time.sleep(1.5)  # CEL's LINKEDID_END and the last events
    finally:
        rec.terminate()
        rec.wait()
    rows = cel_rows(pbx, [c["linkedid"] for c in calls])
    write_cel(os.path.join(out, "cel.sqlite3"), rows)
    recs = recordings_of(pbx, rows)
    for c in calls:
        files = recs.get(c["linkedid"], [])
        c["recording_file"] = sorted(files)[0][0] if files else None
        for name, path in files:
            shutil.copy(path, os.path.join(out, "recordings", name))
    expected = {"scenario": scenario.name, "asterisk_version": pbx.version, "channel_technology": "Local",
                "design": (scenario.__doc__ or "").strip(), "calls": calls,
                "ground_truth": "written from the scenario's design in tests/live_scenarios.py; "
                                "linkedids chosen by the driver (Originate ChannelId), recording "
                                "names as MixMonitor wrote them"}
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
    return calls


def main(argv):
    version = argv[1]
    names = argv[2:] or [s.name for s in live_scenarios.ALL]
    pbx = LiveAsterisk(version).start()
    try:
        base = os.path.join(TESTS, "fixtures", "asterisk-%s-live" % version)
        for name in names:
            calls = record(pbx, live_scenarios.BY_NAME[name], os.path.join(base, name))
            print("%s: %d call(s) recorded" % (name, len(calls)))
    finally:
        pbx.stop()


if __name__ == "__main__":
    main(sys.argv)
