"""The health registry: records made elsewhere (a store's), change callbacks, refusals, summary."""

from __future__ import annotations

from gateway.health import ComponentHealth, Health


def test_on_change_sees_every_component_then_each_change_of_state() -> None:
    health = Health()
    health.component("mqtt")
    seen: list[tuple[str, str]] = []
    health.on_change(lambda c: seen.append((c.name, c.state)))
    assert seen == [("mqtt", "starting")]  # the components already there
    store = ComponentHealth("database")  # made by a store before any registry knew it
    health.add(store)
    assert health.component("database") is store and seen[-1] == ("database", "starting")
    store.set("ok")
    store.set("ok")  # no change of state: no call
    store.detail["reconnects"] = 1
    assert seen[-1] == ("database", "ok") and len(seen) == 3
    store.set("degraded", "gone", code="db_unavailable")
    assert seen[-1] == ("database", "degraded")


def test_a_refusal_in_an_added_record_reaches_the_registry() -> None:
    health = Health(starting=True)
    refused: list[str] = []
    health.on_refusal(lambda c: refused.append(c.name))
    store = health.add(ComponentHealth("database"))
    store.set("degraded", "role does not exist", code="db_refused", refused=True)
    assert refused == ["database"] and health.refusal is store
    assert health.overall == "starting"
    health.started = True
    assert health.summary() == "degraded; mqtt starting; db degraded; backlog ?"
