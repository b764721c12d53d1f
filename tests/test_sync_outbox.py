"""The outbox state machine: one guarded change per action, claims under leases, group order, reclaiming a
dead sender's rows, supersede, retry (audited), and the summary the UI shows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgescreen.appliance.store import Store, outbox
from edgescreen.appliance.store.outbox import OutboxError, OutboxItem
from edgescreen.appliance.sync.status import summary


def _store(tmp_path: Path) -> Store:
    return Store(tmp_path / "data")


def _add(store: Store, *items: OutboxItem, now: float | None = None) -> list[int]:
    with store.transaction() as conn:
        return outbox.add_items(conn, items, now=now)


def test_add_is_idempotent_and_claims_are_exclusive(tmp_path: Path) -> None:
    store = _store(tmp_path)
    a = OutboxItem("cloud.finding", "k1", {"n": 1})
    assert _add(store, a) == _add(store, a)
    assert store.query_one("SELECT COUNT(*) FROM outbox")[0] == 1
    now = time.time()
    got = outbox.claim(store, "host:1:a", 60, kinds=["cloud.finding"], now=now)
    assert [r["idempotency_key"] for r in got] == ["k1"] and got[0]["state"] == "sending"
    assert outbox.claim(store, "host:2:b", 60, kinds=["cloud.finding"], now=now + 1) == [], "leased"
    assert not outbox.settle(store, got[0]["id"], "sent", "host:2:b"), "only the lease holder settles"
    # the lease runs out (its sender hung): another sender takes it; the first one's late answer is refused
    again = outbox.claim(store, "host:2:b", 60, kinds=["cloud.finding"], now=now + 61)
    assert [r["id"] for r in again] == [got[0]["id"]]
    assert not outbox.settle(store, got[0]["id"], "sent", "host:1:a")
    assert outbox.settle(store, got[0]["id"], "sent", "host:2:b", sent_at=now)
    assert store.query_one("SELECT state, lease_owner FROM outbox")[:] == ("sent", None)
    assert outbox.claim(store, "host:3:c", 60, kinds=["cloud.finding"], now=now + 1000) == []


def test_a_studys_items_go_in_order(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ids = _add(store, OutboxItem("cloud.finding", "s1-a", group_key="g1"), OutboxItem("cloud.seg", "s1-b",
               group_key="g1"), OutboxItem("cloud.finding", "s2-a", group_key="g2"))
    kinds = ["cloud.finding", "cloud.seg"]
    first = outbox.claim(store, "h:1:x", 60, kinds=kinds)
    assert [r["id"] for r in first] == [ids[0], ids[2]], "s1-b waits for s1-a"
    assert outbox.claim(store, "h:1:x", 60, kinds=kinds) == []
    outbox.settle(store, ids[0], "defer", "h:1:x", next_attempt_at=0, attempts=1, last_error="boom")
    assert [r["id"] for r in outbox.claim(store, "h:1:x", 60, kinds=kinds)] == [ids[0]], "still s1-a first"
    outbox.settle(store, ids[0], "sent", "h:1:x")
    assert [r["id"] for r in outbox.claim(store, "h:1:x", 60, kinds=kinds)] == [ids[1]]


def test_a_dead_senders_rows_come_back_at_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    (i,) = _add(store, OutboxItem("cloud.finding", "k"))
    outbox.claim(store, "thisbox:4242:aa", 3600, kinds=["cloud.finding"])
    assert outbox.reclaim_dead(store, "otherbox", lambda pid: False) == 0, "another host's sender is not ours"
    assert outbox.reclaim_dead(store, "thisbox", lambda pid: True) == 0, "alive: keep its lease"
    assert outbox.reclaim_dead(store, "thisbox", lambda pid: pid != 4242) == 1
    assert store.query_one("SELECT state, lease_owner FROM outbox WHERE id = ?", (i,))[:] == ("pending", None)


def test_guarded_changes_refuse_what_the_machine_forbids(tmp_path: Path) -> None:
    store = _store(tmp_path)
    (i,) = _add(store, OutboxItem("cloud.health", "h1"))
    with store.transaction() as conn:
        assert not outbox.change(conn, i, "sent", owner="x"), "pending -> sent skips sending"
        with pytest.raises(OutboxError, match="unknown outbox action"):
            outbox.change(conn, i, "explode")
        with pytest.raises(OutboxError, match="cannot set"):
            outbox.change(conn, i, "retry", kind="pacs")
        with pytest.raises(OutboxError, match="lease holder"):
            outbox.change(conn, i, "sent")
    (j,) = _add(store, OutboxItem("cloud.health", "h2"))
    with store.transaction() as conn:
        assert outbox.supersede_pending(conn, "cloud.health", keep_id=j) == 1
    assert store.query_one("SELECT state FROM outbox WHERE id = ?", (i,))[0] == "superseded"
    with pytest.raises(OutboxError, match="only failed or pending"):
        outbox.retry(store, i, "tech")


def test_retry_is_audited_and_the_summary_reports(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ids = _add(store, OutboxItem("pacs", "p1"), OutboxItem("cloud.seg", "c1"), OutboxItem("cloud.finding", "c2"))
    for row in outbox.claim(store, "h:1:x", 60, kinds=["pacs", "cloud.seg", "cloud.finding"]):
        if row["kind"] == "cloud.seg":
            outbox.settle(store, row["id"], "give_up", "h:1:x", attempts=1, last_error="refused: HTTP 422")
        elif row["kind"] == "pacs":
            outbox.settle(store, row["id"], "sent", "h:1:x", sent_at=123.0, attempts=1)
        else:
            outbox.settle(store, row["id"], "defer", "h:1:x", attempts=1, next_attempt_at=time.time() + 50,
                          last_error="cannot reach")
    s = summary(store)
    assert (s["pacs"]["pending"], s["pacs"]["last_success"], s["pacs"]["last_error"]) == (0, 123.0, None)
    assert s["cloud"]["pending"] == 1 and s["cloud"]["failed"] == 1 and s["cloud"]["last_error"] in (
        "refused: HTTP 422", "cannot reach")
    row = outbox.retry(store, ids[1], "tech-bob")
    assert (row["state"], row["attempts"], row["last_error"]) == ("pending", 0, None)
    audit = store.query_one("SELECT actor, action, target, detail FROM audit WHERE action = 'outbox.retry'")
    assert (audit["actor"], audit["target"]) == ("tech-bob", str(ids[1]))
    assert json.loads(audit["detail"])["from"] == "failed"
    assert outbox.expedite(store, ["cloud.finding"]) == 1
    assert store.query_one("SELECT next_attempt_at FROM outbox WHERE id = ?", (ids[2],))[0] <= time.time()


def test_a_clock_set_back_holds_neither_deferred_items_nor_dead_leases(tmp_path: Path) -> None:
    """A box that booted with its clock two days ahead, deferred an item and leased another, then NTP set the
    clock right: both are claimable at once, not in two days."""
    store = _store(tmp_path)
    ahead = time.time() + 2 * 86400
    deferred, leased = _add(store, OutboxItem("cloud.finding", "d1"), OutboxItem("cloud.finding", "l1"), now=ahead)
    assert outbox.claim(store, "otherhost:1:a", 600, kinds=["cloud.finding"], now=ahead) != []
    with store.transaction() as conn:  # as written by that fast clock: one deferred 30 min, one leased
        assert outbox.change(conn, deferred, "defer", owner="otherhost:1:a", now=ahead,
                             next_attempt_at=ahead + 1800, lease_owner=None, lease_expires=None)
    got = outbox.claim(store, "thisbox:2:b", 60, kinds=["cloud.finding"])  # the clock is right again
    assert sorted(r["idempotency_key"] for r in got) == ["d1", "l1"]
    # and a row changed within the minute ahead is not treated so: a normal backoff still holds
    (n,) = _add(store, OutboxItem("cloud.finding", "n1"))
    outbox.claim(store, "thisbox:2:b", 60, kinds=["cloud.finding"])
    outbox.settle(store, n, "defer", "thisbox:2:b", next_attempt_at=time.time() + 1800)
    assert outbox.claim(store, "thisbox:2:b", 60, kinds=["cloud.finding"]) == []


def test_sent_marks_and_the_next_claim_commit_together(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ids = _add(store, *(OutboxItem("cloud.finding", f"k{i}") for i in range(5)))
    first, lost = outbox.settle_and_claim(store, "h:1:a", 60, [], kinds=["cloud.finding"], limit=3)
    assert [r["id"] for r in first] == ids[:3] and lost == []
    marks = [(r["id"], "sent", {"sent_at": 1.0, "attempts": 1}) for r in first]
    marks.append((ids[3], "sent", {"sent_at": 1.0}))  # not ours (never claimed): reported, not settled
    second, lost = outbox.settle_and_claim(store, "h:1:a", 60, marks, kinds=["cloud.finding"], limit=3)
    assert [r["id"] for r in second] == ids[3:] and lost == [ids[3]]
    states = {r["id"]: (r["state"], r["lease_owner"]) for r in store.query("SELECT id, state, lease_owner FROM outbox")}
    assert [states[i] for i in ids[:3]] == [("sent", None)] * 3
    assert outbox.settle_and_claim(store, "h:1:a", 60, [(ids[3], "sent", {})], kinds=["cloud.finding"],
                                   limit=0) == ([], [])


def test_items_behind_a_failed_one_are_blocked_and_not_due(tmp_path: Path) -> None:
    store = _store(tmp_path)
    head, tail, other = _add(store, OutboxItem("cloud.seg", "g1-a", group_key="g1"),
                             OutboxItem("cloud.sr", "g1-b", group_key="g1"), OutboxItem("cloud.finding", "g2-a"))
    kinds = ["cloud.seg", "cloud.sr", "cloud.finding"]
    for row in outbox.claim(store, "h:1:a", 60, kinds=kinds):
        if row["id"] == head:
            outbox.settle(store, head, "give_up", "h:1:a", last_error="result file missing")
        else:
            outbox.settle(store, row["id"], "defer", "h:1:a", next_attempt_at=time.time() + 300)
    assert outbox.blocked(store, kinds) == 1
    assert summary(store)["cloud"]["blocked"] == 1
    due = outbox.next_due(store, kinds)
    assert due is not None and due > time.time() + 200, "only the other study's deferred item can move"
    with store.transaction() as conn:
        assert outbox.change(conn, other, "supersede")
    assert outbox.next_due(store, kinds) is None, "what is left waits behind a failed item"
    outbox.retry(store, head, "tech")
    assert outbox.blocked(store, kinds) == 0 and outbox.next_due(store, kinds) == 0
    assert [r["id"] for r in outbox.claim(store, "h:1:a", 60, kinds=kinds)] == [head], "the head first, then its tail"
    outbox.settle(store, head, "sent", "h:1:a")
    assert [r["id"] for r in outbox.claim(store, "h:1:a", 60, kinds=kinds)] == [tail]
