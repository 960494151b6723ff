"""PostgreSQL time partitions of messages (issue 15, migration 0004): the conversion of a populated
table, the idempotency key across partitions, partitions created ahead (rows of the DEFAULT
partition moved into them), and retention dropping whole partitions; against a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import pytest
import trio

from gateway.retention import RetentionPolicy, prune_expired
from gateway.store import migrate, open_store, partitions
from gateway.store.base import NewMessage, Store
from tests.support.pg import db_settings, psql
from tests.test_retention import deleted
from tests.test_store import msg

_DIGEST = "SELECT md5(string_agg(id || device_id || dedupe_key || measurements::text, ',' ORDER BY id)) FROM messages"


@asynccontextmanager
async def pg_store(url: str, **overrides: object) -> AsyncIterator[Store]:
    async with open_store(db_settings(url, **overrides)) as st, trio.open_nursery() as nursery:
        await nursery.start(st.run)
        yield st
        nursery.cancel_scope.cancel()


async def sql(url: str, text: str) -> list[str]:
    return (await trio.to_thread.run_sync(psql, url, text)).split()


async def partition_names(url: str) -> list[str]:
    return sorted(
        await sql(
            url,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'messages'::regclass",
        )
    )


def test_periods() -> None:
    t = datetime(2026, 12, 31, 23, 30, tzinfo=UTC)
    assert partitions.period_start(t, "month") == datetime(2026, 12, 1, tzinfo=UTC)
    assert partitions.next_boundary(t, "month") == datetime(2027, 1, 1, tzinfo=UTC)
    assert partitions.next_boundary(t, "day") == datetime(2027, 1, 1, tzinfo=UTC)
    # After the conversion the newest partition ends at a day boundary: the next one fills the month.
    legacy = partitions.RangePartition("messages_legacy", None, datetime(2026, 12, 3, tzinfo=UTC))
    ranges = partitions.missing([legacy], datetime(2026, 12, 2, 12, tzinfo=UTC), "month")
    assert ranges == [
        (datetime(2026, 12, 3, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime(2027, 1, 1, tzinfo=UTC), datetime(2027, 2, 1, tzinfo=UTC)),
        (datetime(2027, 2, 1, tzinfo=UTC), datetime(2027, 3, 1, tzinfo=UTC)),
    ]
    assert partitions.partition_name(ranges[0][0]) == "messages_p20261203"


async def test_migration_converts_a_populated_table(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """100,000 readings written through the store at 0003, then 0004: every row, id and key kept,
    redeliveries still found, new ids continue, and the table is partitioned."""
    every = migrate.load_migrations
    monkeypatch.setattr(migrate, "load_migrations", lambda d: [f for f in every(d) if f.version < 4])
    devices = [f"dev-{d}" for d in range(10)]
    batches = [[msg(d, n) for d in devices for n in range(start, start + 200)] for start in range(0, 10_000, 200)]
    stored: dict[tuple[str, str], int] = {}
    async with pg_store(pg_url) as st:
        assert max(m.version for m in await st.migration_status() if m.applied_at) == 3
        for batch in batches:
            for m, out in zip(batch, await st.write_batch(batch, []), strict=True):
                assert not out.duplicate
                stored[(m.device_id, m.dedupe_key)] = out.id
    # 500 processed, marked in SQL: today's claim reads columns that later migrations add (0006).
    await sql(
        pg_url, "UPDATE messages SET processed_at = now() WHERE id IN (SELECT id FROM messages ORDER BY id LIMIT 500)"
    )
    assert len(stored) == 100_000
    before = await sql(pg_url, _DIGEST)

    monkeypatch.setattr(migrate, "load_migrations", every)
    async with pg_store(pg_url) as st:
        assert 4 in [m.version for m in await st.migration_status() if m.applied_at]
        partitioned = "SELECT count(*) FROM pg_partitioned_table WHERE partrelid = 'messages'::regclass"
        assert await sql(pg_url, partitioned) == ["1"]
        assert await sql(pg_url, _DIGEST) == before
        assert await sql(pg_url, "SELECT count(*) FROM message_keys") == ["100000"]
        assert await sql(pg_url, "SELECT count(*) FROM messages WHERE processed_at IS NOT NULL") == ["500"]
        # Every redelivery is found with its first id, whichever partition it is in.
        for batch in batches:
            again = await st.write_batch([m._replace(received_at=datetime.now(UTC)) for m in batch], [])
            assert [(o.id, o.duplicate) for o in again] == [(stored[(m.device_id, m.dedupe_key)], True) for m in batch]
        # New readings go on with the old sequence and land in the current partition.
        new = await st.write_batch([msg("dev-new", 1, received_at=datetime.now(UTC))], [])
        assert not new[0].duplicate and new[0].id > max(stored.values())
        where = await sql(pg_url, f"SELECT tableoid::regclass FROM messages WHERE id = {new[0].id}")
        assert where == ["messages_legacy"] or where[0].startswith("messages_p")
        # The processor's claim still works over the partitions.
        claimed = await st.claim("me", 1000, 30)
        assert len(claimed) == 1000 and [m.id for m in claimed] == sorted(m.id for m in claimed)
        assert min(m.id for m in claimed) > 500
    names = await partition_names(pg_url)
    assert "messages_legacy" in names and "messages_default" in names
    assert len([n for n in names if n.startswith("messages_p")]) >= 2  # created ahead at start


def _at(device: str, n: int, when: datetime) -> NewMessage:
    return msg(device, n, received_at=when)


async def test_default_partition_rows_move_into_a_new_partition(pg_url: str) -> None:
    async with pg_store(pg_url, MESSAGE_PARTITION="day") as st:
        far = datetime.now(UTC) + timedelta(days=30)
        [out] = await st.write_batch([_at("dev-1", 1, far)], [])
        assert await sql(pg_url, f"SELECT tableoid::regclass FROM messages WHERE id = {out.id}") == ["messages_default"]
        done = await st.maintain_partitions(far, None, 100)
        assert partitions.partition_name(partitions.period_start(far, "day")) in done.created
        where = await sql(pg_url, f"SELECT tableoid::regclass FROM messages WHERE id = {out.id}")
        assert where == [partitions.partition_name(partitions.period_start(far, "day"))]
        # Partitions are contiguous, day by day, up to two days after ``far``.
        again = await st.maintain_partitions(far, None, 100)
        assert again.created == ()
        assert (await st.write_batch([_at("dev-1", 1, far)], []))[0].duplicate


async def test_retention_drops_whole_partitions(pg_url: str) -> None:
    """A partition wholly older than MESSAGE_RETENTION with every reading processed goes whole,
    its keys with it; one holding an unprocessed reading stays (the batched delete takes its
    processed rows); counted in the metric's rows and shown in the health detail."""
    async with pg_store(pg_url, MESSAGE_PARTITION="month") as st:
        now = datetime.now(UTC)
        future = now + timedelta(days=150)
        await st.maintain_partitions(future, None, 100)  # months up to future + 2
        first = partitions.next_boundary(now + timedelta(days=40), "month")  # a whole month partition
        second = partitions.next_boundary(first, "month")
        old = [_at("dev-1", n, first + timedelta(hours=n)) for n in range(30)]
        kept = [_at("dev-2", n, second + timedelta(hours=n)) for n in range(10)]
        ids = [o.id for o in await st.write_batch(old + kept, [])]
        claimed = await st.claim("me", 100, 30)
        await st.complete("me", [m.id for m in claimed if m.id != ids[-1]], [], [])  # one of kept stays pending

        policy = RetentionPolicy(events=None, rejects=None, messages=1.0, batch=4)
        later = partitions.next_boundary(second, "month") + timedelta(days=1)
        before = deleted("messages")
        removed = await prune_expired(st, policy, later)
        assert removed == {"messages": 39}  # 30 by the drop, 9 by the batched delete
        assert deleted("messages") - before == 39  # gateway_retention_deleted_total{table="messages"}
        names = await partition_names(pg_url)
        assert partitions.partition_name(first) not in names
        assert partitions.partition_name(second) in names  # an unprocessed reading holds it
        assert await sql(pg_url, "SELECT count(*) FROM message_keys WHERE device_id = 'dev-1'") == ["0"]
        assert await sql(pg_url, "SELECT id FROM messages") == [str(ids[-1])]
        detail = st.health.detail["retention"]
        assert detail["deleted_last_run"] == {"messages": 39}
        assert partitions.partition_name(first) in detail["partitions"]["dropped_last_run"]
        assert detail["partitions"]["count"] == len(names)
        # A redelivery of a dropped reading is a new reading again (its key went with it).
        assert not (await st.write_batch([old[0]], []))[0].duplicate


async def test_a_busy_table_defers_the_drop(pg_url: str) -> None:
    """DROP waits at most lock_timeout for its lock on messages (ingest would queue behind it),
    then gives up until the next run."""
    async with pg_store(pg_url) as st:
        now = datetime.now(UTC)
        await st.maintain_partitions(now + timedelta(days=100), None, 100)
        first = partitions.next_boundary(now + timedelta(days=40), "month")
        [out] = await st.write_batch([_at("dev-1", 1, first)], [])
        claimed = await st.claim("me", 10, 30)
        await st.complete("me", [m.id for m in claimed], [], [])
        later = partitions.next_boundary(first, "month")
        await st.maintain_partitions(now, first, 100)  # the empty ones before: only ``first`` is left to drop

        def hold() -> None:  # a long API read: ACCESS SHARE on messages and its partitions
            psql(pg_url, "BEGIN; SELECT count(*) FROM messages; SELECT pg_sleep(5); COMMIT;")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, hold)
            await trio.sleep(1.0)  # the read has its lock
            t = trio.current_time()
            busy = await st.maintain_partitions(now, later, 100)
            assert trio.current_time() - t < 3.5  # gave up after lock_timeout (2 s), not after the read (5 s)
            assert partitions.partition_name(first) not in busy.dropped
            assert partitions.partition_name(first) in await partition_names(pg_url)
        free = await st.maintain_partitions(now, later, 100)
        assert partitions.partition_name(first) in free.dropped and free.dropped_rows >= 1
        assert await sql(pg_url, f"SELECT count(*) FROM messages WHERE id = {out.id}") == ["0"]
