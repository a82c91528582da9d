"""The plugin's own tests: retain.testing's fixtures are there because retain is installed."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import retain_vip_alerts

from retain.testing import EventFactory, RunResult

PLUGIN = ("vip_alerts", retain_vip_alerts)


def test_a_vip_detractor_gets_a_high_priority_ticket(
    retain_run: Callable[..., RunResult], event_factory: EventFactory
) -> None:
    f = event_factory
    events = [
        f.purchase(customer_id="big", amount="1500", days=1),
        f.feedback(customer_id="big", score=5, days=2),
        f.purchase(customer_id="small", amount="15", days=1),
        f.feedback(customer_id="small", score=5, days=2),
    ]
    result = retain_run(events, PLUGIN)

    tickets = result.actions_of(strategy="vip_alerts", kind="open_ticket")
    assert [(t.customer_id, t.priority, t.queue) for t in tickets] == [("big", "high", "vip-care")]
    assert result.plugin_state("big", "vip_alerts") == {"escalations": 1}


def test_staff_are_not_offered_discounts(
    retain_run: Callable[..., RunResult], event_factory: EventFactory
) -> None:
    f = event_factory
    events = [
        f.consent(customer_id="emp-7", days=0),
        f.purchase(customer_id="emp-7", days=1, subscription_id="s1"),
        f.cancellation(customer_id="emp-7", days=12, reference_id="s1"),
    ]
    result = retain_run(events, PLUGIN, options={"vip_alerts": {"staff_prefixes": ["emp-"]}})

    offer = result.actions_of(kind="offer_discount")[0]
    assert offer.reason == "vetoed by vip_alerts: staff accounts are not offered discounts"


def test_a_bad_option_is_named() -> None:
    with pytest.raises(ValueError, match="vip_alerts: option 'vip_spend'"):
        retain_vip_alerts.parse_options({"vip_spend": -1})
