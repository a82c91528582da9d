"""The built-in strategies, driven through retain.testing's harness as a plugin author would."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from retain.core.actions import AwardPoints, OfferDiscount, OpenTicket, SendMessage, SendSurvey
from retain.core.config import Settings
from retain.core.manager import HookContext
from retain.plugins import loyalty, personalisation, surveys
from retain.testing import EventFactory, Harness, RunResult, make_settings

Run = Callable[..., RunResult]


def only(actions: list[Any]) -> Any:
    assert len(actions) == 1, actions
    return actions[0]


# -- personalisation -------------------------------------------------------------------------
def test_follow_up_names_the_customer_and_suggests_related_products(
    retain_run: Run, event_factory: EventFactory
) -> None:
    f = event_factory
    result = retain_run(
        [
            f.consent(channel="sms", days=0),
            f.purchase(days=1, items=["tea", "tea", "coffee"], name="Ada Lovelace"),
        ]
    )

    follow_up = only(result.actions_of(strategy="personalisation", template="follow_up"))
    assert isinstance(follow_up, SendMessage)
    assert follow_up.status == "emitted"
    assert follow_up.channel == "sms"  # the only consented channel
    assert follow_up.payload["greeting"] == "Hi Ada"
    assert follow_up.payload["categories"] == ["tea", "coffee"]
    # Taken in turn from each favourite category.
    assert follow_up.payload["related"] == ["teapots", "grinders", "honey"]


def test_follow_up_without_a_name_says_hi_there(retain_run: Run, event_factory: EventFactory) -> None:
    f = event_factory
    result = retain_run([f.consent(days=0), f.purchase(days=1, category="books")])

    follow_up = only(result.actions_of(template="follow_up"))
    assert follow_up.payload["greeting"] == "Hi there"
    assert follow_up.payload["related"] == ["bookmarks", "reading lights", "e-readers"]


def test_no_follow_up_for_a_purchase_without_items(
    retain_run: Run, event_factory: EventFactory
) -> None:
    f = event_factory
    result = retain_run([f.consent(days=0), f.purchase(days=1, items=[])])

    assert result.actions_of(template="follow_up") == []


def test_at_most_one_follow_up_per_interval(retain_run: Run, event_factory: EventFactory) -> None:
    f = event_factory
    purchases = [f.purchase(days=d, category="tea") for d in (1, 3, 9, 10)]
    result = retain_run([f.consent(days=0), *purchases])

    follow_ups = result.actions_of(template="follow_up")
    assert [a.cause for a in follow_ups] == [purchases[0].event_id, purchases[2].event_id]
    state = result.plugin_state("c1", "personalisation")
    assert state["last_follow_up_ms"] == follow_ups[-1].at_ms


def test_follow_up_interval_and_related_map_are_options(
    retain_run: Run, event_factory: EventFactory
) -> None:
    f = event_factory
    purchases = [f.purchase(days=d, category="tea") for d in (1, 3)]
    result = retain_run(
        [f.consent(days=0), *purchases],
        options={"personalisation": {"follow_up_interval_days": 2, "related": {"tea": ["kettles"]}}},
    )

    follow_ups = result.actions_of(template="follow_up")
    assert len(follow_ups) == 2
    assert follow_ups[0].payload["related"] == ["kettles"]


def test_win_back_on_lapse_names_the_favourite_category_once_per_cycle(
    retain_run: Run, event_factory: EventFactory, retain_settings: Settings
) -> None:
    f = event_factory
    retain_settings.signals.risk_threshold = 25  # so lapse and risk both fire for one silence
    result = retain_run(
        [f.consent(days=0), f.purchase(days=1, items=["garden", "garden", "tea"], name="Grace")],
        advance_days=120,
    )

    assert {"lapse", "risk"} <= set(result.signal_kinds)
    win_back = only(result.actions_of(strategy="personalisation", template="win_back"))
    assert win_back.status == "emitted"
    assert win_back.payload["greeting"] == "Hi Grace"
    assert win_back.payload["favourite_category"] == "garden"
    assert win_back.payload["signal"] == result.signals[0].kind


def test_win_back_again_after_the_customer_came_back_and_lapsed_again(
    retain_run: Run, event_factory: EventFactory
) -> None:
    f = event_factory
    result = retain_run(
        [f.consent(days=0), f.purchase(days=1), f.purchase(days=100)], advance_days=400
    )

    assert result.signal_kinds.count("lapse") == 2
    assert len(result.actions_of(template="win_back")) == 2


def test_without_consent_personalisation_still_proposes_so_policy_records_it(
    retain_run: Run, event_factory: EventFactory
) -> None:
    f = event_factory
    result = retain_run([f.purchase(days=1, category="tea")], advance_days=90)

    for template in ("follow_up", "win_back"):
        action = only(result.actions_of(strategy="personalisation", template=template))
        assert action.channel == "email"
        assert action.status == "suppressed"
        assert action.reason == "no consent for email"


def test_revoked_consent_suppresses_the_follow_up(
    retain_run: Run, event_factory: EventFactory
) -> None:
    f = event_factory
    result = retain_run(
        [
            f.consent(days=0),
            f.purchase(days=1),
            f.consent(days=2, granted=False),
            f.purchase(days=10),
        ]
    )

    assert [(a.status, a.reason) for a in result.actions_of(template="follow_up")] == [
        ("emitted", None),
        ("suppressed", "no consent for email"),
    ]


def test_frequency_cap_suppresses_outreach_beyond_the_cap(
    retain_run: Run, event_factory: EventFactory, retain_settings: Settings
) -> None:
    f = event_factory
    retain_settings.policy.frequency_cap = 1
    result = retain_run(
        [f.consent(days=0), f.purchase(days=1), f.purchase(days=2), f.purchase(days=12)],
        options={
            "personalisation": {"follow_up_interval_days": 0},
            "surveys": {"nps_after_purchases": 10},
        },
    )

    follow_ups = result.actions_of(template="follow_up")
    assert [a.status for a in follow_ups] == ["emitted", "suppressed", "emitted"]
    assert follow_ups[1].reason == "frequency cap: 1 messages in the last 7d"
    # Internal actions are not outreach: the cap never holds back points.
    assert all(a.status == "emitted" for a in result.actions_of(kind="award_points"))


def test_bad_personalisation_option_is_named(retain_settings: Settings) -> None:
    ctx = HookContext("personalisation", retain_settings, {"max_suggestions": 0, "colour": 1})
    with pytest.raises(ValueError) as info:
        personalisation.retain_startup(retain_settings, ctx)
    message = str(info.value)
    assert "personalisation: option 'max_suggestions'" in message
    assert "option 'colour': unknown option" in message


# -- loyalty -----------------------------------------------------------------------------------
def test_points_per_whole_currency_unit(retain_run: Run, event_factory: EventFactory) -> None:
    f = event_factory
    result = retain_run([f.purchase(amount="20.99", days=1), f.purchase(amount="0.50", days=2)])

    award = only(result.actions_of(strategy="loyalty", kind="award_points"))
    assert isinstance(award, AwardPoints)
    assert (award.points, award.reason_code, award.status) == (20, "purchase", "emitted")
    state = result.plugin_state("c1", "loyalty")
    assert (state["balance"], state["lifetime"], state["purchases"]) == (20, 20, 2)


def test_points_per_unit_is_an_option(retain_run: Run, event_factory: EventFactory) -> None:
    f = event_factory
    result = retain_run(
        [f.purchase(amount="20.99", days=1)], options={"loyalty": {"points_per_unit": 3}}
    )

    assert only(result.actions_of(kind="award_points")).points == 60


def test_tier_upgrade_message_when_lifetime_points_cross_a_threshold(
    retain_run: Run, event_factory: EventFactory
) -> None:
    f = event_factory
    result = retain_run(
        [
            f.consent(days=0),
            f.purchase(amount="300", days=1, name="Ada"),
            f.purchase(amount="300", days=20),
            f.purchase(amount="100", days=40),
        ]
    )

    upgrade = only(result.actions_of(template="tier_upgrade"))
    assert upgrade.cause == "purchase-3"
    assert upgrade.payload == {
        "greeting": "Hi Ada",
        "tier": "silver",
        "previous_tier": "bronze",
        "lifetime_points": 600,
    }
    assert result.plugin_state("c1", "loyalty")["tier"] == "silver"


def test_custom_tiers_and_discounts(retain_run: Run, event_factory: EventFactory) -> None:
    f = event_factory
    tiers = [
        {"name": "member", "min_points": 0, "discount_percent": 5},
        {"name": "insider", "min_points": 50, "discount_percent": 25},
    ]
    result = retain_run(
        [f.consent(days=0), f.purchase(amount="60", days=1), f.cancellation(days=2)],
        options={"loyalty": {"tiers": tiers}},
    )

    assert only(result.actions_of(template="tier_upgrade")).payload["tier"] == "insider"
    offer = only(result.actions_of(kind="offer_discount"))
    assert offer.percent == 25


def test_early_access_for_the_top_tier_once_per_30_days(
    retain_run: Run, event_factory: EventFactory
) -> None:
    f = event_factory
    purchases = [f.purchase(amount="2500", days=d) for d in (1, 11, 41)]
    result = retain_run([f.consent(days=0), *purchases])

    early = result.actions_of(template="early_access")
    assert [a.cause for a in early] == [purchases[0].event_id, purchases[2].event_id]
    assert all(a.status == "emitted" for a in early)


def test_referral_bonus_on_the_first_purchase_only(
    retain_run: Run, event_factory: EventFactory
) -> None:
    f = event_factory
    first = f.purchase(amount="10", days=1, referred_by="friend-7")
    result = retain_run([first, f.purchase(amount="10", days=5, referred_by="friend-7")])

    awards = result.actions_of(kind="award_points")
    assert [(a.reason_code, a.points, a.cause) for a in awards] == [
        ("purchase", 10, first.event_id),
        ("referral", 100, f"{first.event_id}:referral"),
        ("purchase", 10, "purchase-2"),
    ]
    assert len(set(result.action_ids)) == len(result.actions)  # distinct idempotency keys
    assert all(a.customer_id == "c1" for a in awards)  # the referrer is not credited here
    assert result.plugin_state("c1", "loyalty")["lifetime"] == 120


def test_no_referral_bonus_for_self_referral(retain_run: Run, event_factory: EventFactory) -> None:
    f = event_factory
    result = retain_run([f.purchase(amount="10", days=1, referred_by="c1")])

    assert [a.reason_code for a in result.actions_of(kind="award_points")] == ["purchase"]


def test_win_back_offer_on_subscription_cancellation_by_tier(
    retain_run: Run, event_factory: EventFactory
) -> None:
    f = event_factory
    result = retain_run(
        [
            f.consent(days=0),
            f.purchase(amount="700", days=1, subscription_id="sub-1"),
            f.cancellation(days=12, scope="order", reference_id="order-2"),
            f.cancellation(days=13, scope="subscription", reference_id="sub-1"),
        ]
    )

    offer = only(result.actions_of(kind="offer_discount"))
    assert isinstance(offer, OfferDiscount)
    assert offer.percent == 15  # silver
    assert offer.code.startswith("WB-")
    assert offer.payload["signal"] == "cancellation"
    assert offer.status == "emitted"


def test_at_most_one_offer_per_purchase_cycle(retain_run: Run, event_factory: EventFactory) -> None:
    f = event_factory
    result = retain_run(
        [
            f.consent(days=0),
            f.purchase(days=1),
            f.cancellation(days=2),  # offer, then the lapse of the same cycle gets none
            f.purchase(days=150),  # a new cycle: its lapse gets a new offer
        ],
        advance_days=500,
    )

    assert result.signal_kinds.count("lapse") == 2
    offers = result.actions_of(kind="offer_discount")
    assert [a.payload["signal"] for a in offers] == ["cancellation", "lapse"]
    assert offers[0].code != offers[1].code


def test_bad_loyalty_tiers_are_named(retain_settings: Settings) -> None:
    tiers = [{"name": "a", "min_points": 0}, {"name": "b", "min_points": 0}]
    ctx = HookContext("loyalty", retain_settings, {"tiers": tiers})
    with pytest.raises(ValueError, match="loyalty: option 'tiers': 'b' must need more points"):
        loyalty.retain_startup(retain_settings, ctx)


def test_a_strategy_with_a_bad_option_fails_without_stopping_the_others(
    retain_run: Run, event_factory: EventFactory
) -> None:
    f = event_factory
    result = retain_run(
        [f.consent(days=0), f.purchase(days=1)], options={"loyalty": {"points_per_unit": -1}}
    )

    assert result.actions_of(strategy="loyalty") == []
    assert result.health["loyalty"].failures >= 1
    assert only(result.actions_of(template="follow_up")).status == "emitted"


# -- surveys -------------------------------------------------------------------------------------
def test_nps_survey_after_the_third_purchase_once(
    retain_run: Run, event_factory: EventFactory
) -> None:
    f = event_factory
    purchases = [f.purchase(days=d) for d in (1, 10, 20, 30)]
    result = retain_run([f.consent(days=0), *purchases])

    survey = only(result.actions_of(kind="send_survey"))
    assert isinstance(survey, SendSurvey)
    assert (survey.survey, survey.cause, survey.status) == ("nps", purchases[2].event_id, "emitted")
    assert result.plugin_state("c1", "surveys")["nps_sent_ms"] == survey.at_ms


def test_nps_after_purchases_is_an_option(retain_run: Run, event_factory: EventFactory) -> None:
    f = event_factory
    result = retain_run(
        [f.consent(days=0), f.purchase(days=1)], options={"surveys": {"nps_after_purchases": 1}}
    )

    assert only(result.actions_of(template="nps")).cause == "purchase-2"


def test_exit_survey_after_subscription_or_account_cancellation(
    retain_run: Run, event_factory: EventFactory
) -> None:
    f = event_factory
    result = retain_run(
        [
            f.consent(days=0),
            f.purchase(days=1, subscription_id="sub-1"),
            f.cancellation(days=2, scope="order", reference_id="order-2"),
            f.cancellation(days=3, scope="subscription", reference_id="sub-1"),
            f.cancellation(days=4, scope="subscription", reference_id="sub-1", reason="price"),
            f.cancellation(days=5, scope="account"),
        ]
    )

    exits = result.actions_of(template="exit")
    assert [a.cause for a in exits] == ["cancellation-4", "cancellation-6"]
    assert result.plugin_state("c1", "surveys")["exit_sent"] == ["subscription:sub-1", "account:"]


@pytest.mark.parametrize(
    ("scale", "score", "priority"),
    [("nps", 0, "high"), ("nps", 3, "high"), ("nps", 5, "normal"), ("csat", 1, "high"),
     ("csat", 2, "normal")],
)
def test_detractor_opens_a_ticket_without_needing_consent(
    retain_run: Run, event_factory: EventFactory, scale: str, score: int, priority: str
) -> None:
    f = event_factory
    result = retain_run(
        [f.purchase(days=1), f.feedback(days=2, scale=scale, score=score, topic="delivery",
                                        comment="Ada here, the parcel was late")]
    )

    ticket = only(result.actions_of(kind="open_ticket"))
    assert isinstance(ticket, OpenTicket)
    assert ticket.status == "emitted"  # no consent at all, but tickets are internal
    assert ticket.priority == priority
    assert ticket.summary == f"Detractor feedback: {scale.upper()} {score} about delivery"
    assert "Ada" not in ticket.summary  # the comment stays out of the ticket


def test_promoters_open_no_ticket(retain_run: Run, event_factory: EventFactory) -> None:
    f = event_factory
    result = retain_run([f.purchase(days=1), f.feedback(days=2, score=9)])

    assert result.actions_of(kind="open_ticket") == []


def test_surveys_respect_consent_and_the_frequency_cap(
    retain_run: Run, event_factory: EventFactory, retain_settings: Settings
) -> None:
    f = event_factory
    retain_settings.policy.frequency_cap = 1
    events = [
        f.purchase(customer_id="quiet", days=1),
        f.cancellation(customer_id="quiet", days=2, scope="account"),
        f.consent(customer_id="busy", days=0),
        f.purchase(customer_id="busy", days=1, items=[]),  # no follow-up, so the cap is free
        f.cancellation(customer_id="busy", days=2, reference_id="s1"),
        f.cancellation(customer_id="busy", days=3, scope="account"),
    ]
    result = retain_run(events, options={"loyalty": {"win_back_signals": []}})

    quiet = only(result.actions_of(template="exit", customer_id="quiet"))
    assert (quiet.status, quiet.reason) == ("suppressed", "no consent for email")
    busy = result.actions_of(template="exit", customer_id="busy")
    assert [(a.status, a.reason) for a in busy] == [
        ("emitted", None),
        ("suppressed", "frequency cap: 1 messages in the last 7d"),
    ]


# -- every strategy together --------------------------------------------------------------------
def rich_history(f: EventFactory) -> list[Any]:
    return [
        f.consent(days=0),
        f.consent(customer_id="c2", channel="sms", days=0),
        f.purchase(amount="120", days=1, items=["tea", "coffee"], name="Ada", referred_by="c2"),
        f.purchase(customer_id="c2", amount="45.5", days=2, category="books"),
        f.purchase(amount="450", days=9, category="tea"),
        f.feedback(days=10, score=2, topic="delivery"),
        f.purchase(amount="1600", days=25, items=["kitchen", "tea"]),
        f.cancellation(customer_id="c2", days=30, scope="subscription", reference_id="s9"),
        f.purchase(customer_id="c2", amount="12", days=33, category="books"),
        f.feedback(customer_id="c2", scale="csat", score=1, days=34),
    ]


def run_fresh(events: list[Any], settings: Settings) -> RunResult:
    with Harness(settings=settings) as harness:
        return harness.run(events, advance_days=200)


def test_replaying_the_same_events_through_a_fresh_engine_is_identical(
    retain_settings: Settings,
) -> None:
    events = rich_history(EventFactory())
    first = run_fresh(events, retain_settings)
    second = run_fresh(events, retain_settings)

    assert {a.strategy for a in first.actions} == {"personalisation", "loyalty", "surveys"}
    assert first.action_ids == second.action_ids
    assert [a.model_dump() for a in first.actions] == [a.model_dump() for a in second.actions]
    assert [s.signal_id for s in first.signals] == [s.signal_id for s in second.signals]
    for customer in ("c1", "c2"):
        assert first.plugin_state(customer) == second.plugin_state(customer)
        assert first.plugin_state(customer)  # there is state to compare


def test_redelivered_events_change_nothing(retain_settings: Settings) -> None:
    events = rich_history(EventFactory())
    with Harness(settings=retain_settings) as harness:
        harness.run(events)
        before = harness.plugin_state("c1")
        again = harness.run(events)
        assert again.actions == []
        assert harness.plugin_state("c1") == before


def test_make_settings_is_hermetic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETAIN_POLICY__FREQUENCY_CAP", "0")
    assert make_settings().policy.frequency_cap == 3


def test_surveys_options_are_checked(retain_settings: Settings) -> None:
    ctx = HookContext("surveys", retain_settings, {"exit_survey_scopes": ["everything"]})
    with pytest.raises(ValueError, match="surveys: option 'exit_survey_scopes'"):
        surveys.retain_startup(retain_settings, ctx)
