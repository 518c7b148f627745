"""The state database: what a done request keeps, how long calls and requests are
kept (by age and by count), and that purged space goes back to the disk."""
import os
import sqlite3
import time

import bx24ast


def _sender(store):
    outbox, records = bx24ast.Outbox(store), bx24ast.CallRecords(store)
    return outbox, records, bx24ast.OutboxSender(outbox, records, None, bx24ast.UserDirectory(), None)


def _size(path):
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def test_housekeeping_drops_old_done_requests_and_call_records_only(tmp_path):
    store = bx24ast.StateStore(str(tmp_path / "s.db"))
    outbox, records, sender = _sender(store)
    assert outbox.ready(0) == []
    old_id = outbox.add("1.1", "show", "m", {"USER_ID": [1]}, 0)
    pending_id = outbox.add("2.1", "show", "m", {"USER_ID": [1]}, 0)
    outbox.done(outbox.ready(time.time())[0])
    records.update("1.1", source="live")
    sender.housekeeping(time.time() + 8 * 86400)
    ids = [r[0] for r in store.query("SELECT id FROM outbox")]
    assert ids == [pending_id] and old_id not in ids
    assert records.registered("1.1")  # kept 90 days
    sender.housekeeping(time.time() + 91 * 86400)
    assert not records.registered("1.1") and [r[0] for r in store.query("SELECT id FROM outbox")] == [pending_id]


def test_a_done_request_keeps_its_kind_and_note_but_not_its_body(tmp_path):
    store = bx24ast.StateStore(str(tmp_path / "s.db"))
    outbox = bx24ast.Outbox(store)
    outbox.add("1.1", "finish", "telephony.externalcall.finish", {"CALL_ID": "x" * 500, "DURATION": 5}, 1)
    req = outbox.ready(time.time())[0]
    outbox.done(req, note="finished by an earlier attempt")
    row = store.query("SELECT * FROM outbox WHERE id = ?", (req.id,))[0]
    assert (row["state"], row["kind"], row["method"], row["last_error"]) == \
        ("done", "finish", "telephony.externalcall.finish", "finished by an earlier attempt")
    assert row["params"] == "{}" and row["result"] is None and row["done_at"]
    # a call closed without sending drops the bodies of all its requests
    outbox.add("2.1", "register", "m", {"PHONE_NUMBER": "+79161234567"}, 0)
    outbox.add("2.1", "show", "m", {"USER_ID": [1]}, 0)
    assert outbox.close_call("2.1", "an internal call") == 2
    assert [r["params"] for r in store.query("SELECT params FROM outbox WHERE linkedid = '2.1'")] == ["{}", "{}"]


def test_retention_by_count_keeps_the_newest_and_every_call_still_waiting_for_its_end(tmp_path, monkeypatch):
    store = bx24ast.StateStore(str(tmp_path / "s.db"))
    outbox, records, sender = _sender(store)
    monkeypatch.setattr(sender, "KEEP_DONE_COUNT", 5)
    monkeypatch.setattr(sender, "KEEP_CALLS_COUNT", 3)
    records.update("0.1", source="live", started_at=1.0)         # reported, its end never seen
    for n in range(1, 11):
        lid = "%d.1" % n
        outbox.add(lid, "show", "m", {"USER_ID": [1]}, 0)
        records.update(lid, source="live", ended_at=float(n))
    for req in outbox.ready(time.time()):
        outbox.done(req)
    waiting = outbox.add("11.1", "register", "m", {}, 0)
    sender.housekeeping(time.time())
    kept = [r["linkedid"] for r in store.query("SELECT linkedid FROM outbox WHERE state = 'done' ORDER BY id")]
    assert kept == ["6.1", "7.1", "8.1", "9.1", "10.1"]
    assert [r["id"] for r in store.query("SELECT id FROM outbox WHERE state = 'pending'")] == [waiting]
    calls = sorted(r["linkedid"] for r in store.query("SELECT linkedid FROM calls"))
    assert calls == sorted(["0.1", "8.1", "9.1", "10.1"])
    assert [c["linkedid"] for c in records.unended()] == ["0.1"]


def test_purged_space_goes_back_to_the_disk(tmp_path, monkeypatch):
    path = str(tmp_path / "s.db")
    store = bx24ast.StateStore(path)
    outbox, records, sender = _sender(store)
    monkeypatch.setattr(sender, "KEEP_CALLS_COUNT", 10)
    with store.transaction():
        for n in range(5000):
            records.update("%d.1" % n, source="live", external_number="+7916%07d" % n, ended_at=1.0,
                           created_entities='[{"ENTITY_TYPE": "LEAD", "ENTITY_ID": %d}]' % n)
    store.checkpoint()
    full = _size(path)
    sender.housekeeping(time.time())
    assert _size(path) < full / 5, (full, _size(path))
    assert len(store.query("SELECT 1 FROM calls")) == 10


def test_a_database_of_an_older_version_is_rewritten_once_for_incremental_vacuum(tmp_path):
    path = str(tmp_path / "bx24ast.db")
    old = sqlite3.connect(path)
    old.executescript(bx24ast._SCHEMA)
    old.execute("INSERT INTO calls (linkedid, source) VALUES ('1.1', 'live')")
    old.commit()
    assert old.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    old.close()
    store = bx24ast.StateStore(path)
    assert store.query("PRAGMA auto_vacuum")[0][0] == 2
    assert bx24ast.CallRecords(store).registered("1.1")
    store.close()
    again = bx24ast.StateStore(path)
    assert again.query("PRAGMA auto_vacuum")[0][0] == 2
    again.close()


def test_housekeeping_runs_hourly_and_as_often_as_done_requests_fill_what_is_kept(tmp_path, monkeypatch):
    store = bx24ast.StateStore(str(tmp_path / "s.db"))
    outbox, records, sender = _sender(store)
    monkeypatch.setattr(sender, "KEEP_DONE_COUNT", 5)
    now = time.time()
    assert sender.housekeeping_due(now)
    sender.housekeeping(now)
    for n in range(4):
        outbox.add("%d.1" % n, "show", "m", {"USER_ID": [1]}, 0)
    for req in outbox.ready(now):
        outbox.done(req)
    assert not sender.housekeeping_due(now + 60)
    outbox.add("9.1", "register", "m", {}, 0)
    assert outbox.close_call("9.1", "internal") == 1
    assert sender.housekeeping_due(now + 60), "five requests done: as many as are kept"
    sender.housekeeping(now + 60)
    assert not sender.housekeeping_due(now + 120) and sender.housekeeping_due(now + 3700)


def test_a_request_that_waited_long_gets_a_share_of_a_batch_full_of_cards(tmp_path):
    store = bx24ast.StateStore(str(tmp_path / "s.db"))
    outbox = bx24ast.Outbox(store)
    now = time.time()
    task = outbox.add("1.1", "task", "tasks.task.add", {"fields": {}}, bx24ast.PRIORITY_LATER, not_before=now - 60)
    fresh = outbox.add("2.1", "task", "tasks.task.add", {"fields": {}}, bx24ast.PRIORITY_LATER, not_before=now)
    for n in range(60):
        outbox.add("%d.9" % (100 + n), "register", "telephony.externalcall.register", {}, bx24ast.PRIORITY_CARD)
    ready = outbox.ready(now + 1, 50)
    ids = [r.id for r in ready]
    assert len(ready) == 50 and task in ids, "a task due for a minute rides along"
    assert fresh not in ids, "a task due now waits behind the cards"
    assert [r.kind for r in ready[:49]] == ["register"] * 49
    # with room for everything, the order is plain urgency
    assert [r.id for r in outbox.ready(now + 1, 100)][-2:] == [task, fresh]
