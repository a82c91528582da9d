"""Tests for the BG/NBD and Gamma-Gamma maths in retain.core.btyd.

Statistical checks use fixed seeds (so they are deterministic) and tolerances derived from
the sampling error of the estimate, not from what one particular seed happened to give.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import numpy.typing as npt
import pytest
from scipy import special, stats

from retain.core import btyd

TRUE = btyd.BGNBDParams(
    r=0.24, alpha=4.41, a=0.79, b=2.43, log_likelihood=0.0, n_customers=0, time_unit="week"
)
WEEKS = 39.0
CHI2_4_999 = float(stats.chi2.ppf(0.999, 4))
CHI2_3_999 = float(stats.chi2.ppf(0.999, 3))

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def textbook_log_likelihood(
    params: tuple[float, float, float, float], x: list[int], t_x: list[float], T: list[float]
) -> float:
    """Equation (6) of Fader, Hardie & Lee (2005) evaluated literally, outside log space."""
    r, alpha, a, b = params
    total = 0.0
    for xi, ti, Ti in zip(x, t_x, T, strict=True):
        common = math.gamma(r + xi) * alpha**r / math.gamma(r)
        alive = special.beta(a, b + xi) / special.beta(a, b) * common / (alpha + Ti) ** (r + xi)
        dead = 0.0
        if xi > 0:
            dead = (
                special.beta(a + 1, b + xi - 1)
                / special.beta(a, b)
                * common
                / (alpha + ti) ** (r + xi)
            )
        total += math.log(alive + dead)
    return total


def simulate_events(
    params: btyd.BGNBDParams, n: int, T: float, horizon: float, seed: int
) -> tuple[IntArray, FloatArray, IntArray, npt.NDArray[np.bool_]]:
    """Event-by-event BG/NBD simulation, written independently of ``simulate_bgnbd``.

    Steps every customer through exponential inter-purchase gaps and a coin flip for
    drop-out after each repeat purchase. Returns the history at T (x, t_x), the number of
    purchases in (T, T + horizon], and whether the customer was still alive at T.
    """
    rng = np.random.default_rng(seed)
    lam = rng.gamma(params.r, 1.0 / params.alpha, n)
    drop = rng.beta(params.a, params.b, n)
    now = np.zeros(n)
    x = np.zeros(n, dtype=np.int64)
    t_x = np.zeros(n)
    future = np.zeros(n, dtype=np.int64)
    death = np.full(n, np.inf)
    active = np.flatnonzero(lam > 0)
    end = T + horizon
    while active.size:
        now[active] += rng.exponential(1.0 / lam[active])
        t = now[active]
        in_history = t <= T
        in_future = (t > T) & (t <= end)
        x[active[in_history]] += 1
        t_x[active[in_history]] = t[in_history]
        future[active[in_future]] += 1
        bought = t <= end
        leaves = rng.random(active.size) < drop[active]
        death[active[bought & leaves]] = t[bought & leaves]
        active = active[bought & ~leaves]
    return x, t_x, future, death > T


@pytest.fixture(scope="module")
def cdnow_like() -> tuple[IntArray, FloatArray, FloatArray]:
    return btyd.simulate_bgnbd(TRUE, 5000, WEEKS, seed=20050101)


@pytest.fixture(scope="module")
def event_sim() -> tuple[IntArray, FloatArray, IntArray, npt.NDArray[np.bool_]]:
    return simulate_events(TRUE, 200_000, WEEKS, horizon=26.0, seed=7)


# --------------------------------------------------------------------------------------
# Parameters container
# --------------------------------------------------------------------------------------


def test_params_round_trip_through_json() -> None:
    params = btyd.BGNBDParams(
        r=np.float64(0.3),  # type: ignore[arg-type]
        alpha=2.0,
        a=0.5,
        b=1.5,
        log_likelihood=np.float64(-12.5),  # type: ignore[arg-type]
        n_customers=np.int64(40),  # type: ignore[arg-type]
        time_unit="week",
        converged=np.bool_(True),  # type: ignore[arg-type]
    )
    data = params.to_dict()
    assert all(type(v) in (float, int, str, bool) for v in data.values())
    back = btyd.BGNBDParams.from_dict(json.loads(json.dumps(data)))
    assert back == btyd.BGNBDParams(0.3, 2.0, 0.5, 1.5, -12.5, 40, "week", True)

    gg = btyd.GammaGammaParams(p=6.0, q=3.5, v=15.0, log_likelihood=-3.0, n_customers=9)
    assert btyd.GammaGammaParams.from_dict(json.loads(json.dumps(gg.to_dict()))) == gg


def test_params_reject_non_positive_values() -> None:
    with pytest.raises(ValueError, match="alpha"):
        btyd.BGNBDParams(r=1.0, alpha=0.0, a=1.0, b=1.0, log_likelihood=0.0, n_customers=1)
    with pytest.raises(ValueError, match="q"):
        btyd.GammaGammaParams(p=1.0, q=float("nan"), v=1.0, log_likelihood=0.0, n_customers=1)


# --------------------------------------------------------------------------------------
# Likelihood
# --------------------------------------------------------------------------------------


def test_log_likelihood_matches_textbook_formula() -> None:
    x = [0, 0, 1, 2, 5, 3, 7]
    t_x = [0.0, 0.0, 4.5, 10.0, 30.2, 1.0, 38.9]
    T = [0.0, 12.0, 20.0, 39.0, 38.0, 39.0, 39.0]
    for params in [(0.24, 4.41, 0.79, 2.43), (2.0, 1.0, 3.0, 0.5), (0.5, 30.0, 1.0, 1.0)]:
        expected = textbook_log_likelihood(params, x, t_x, T)
        got = btyd.bgnbd_log_likelihood(params, x, t_x, T)
        assert got == pytest.approx(expected, rel=1e-11, abs=1e-11)


def test_log_likelihood_stays_finite_where_textbook_overflows() -> None:
    # (alpha + T)^(r + x) overflows a double for x = 400 and T = 2000 days.
    ll = btyd.bgnbd_log_likelihood((0.5, 3.0, 1.2, 4.0), [400, 0], [1900.0, 0.0], [2000.0, 2000.0])
    assert math.isfinite(ll)


def test_log_likelihood_weights_equal_repeated_rows() -> None:
    params = (0.3, 5.0, 0.8, 2.0)
    x, t_x, T = [0, 2, 2], [0.0, 5.0, 5.0], [10.0, 12.0, 12.0]
    weighted = btyd.bgnbd_log_likelihood(params, [0, 2], [0.0, 5.0], [10.0, 12.0], weights=[1, 2])
    assert weighted == pytest.approx(btyd.bgnbd_log_likelihood(params, x, t_x, T), rel=1e-13)
    assert btyd.bgnbd_log_likelihood((0.3, -1.0, 0.8, 2.0), x, t_x, T) == float("-inf")


def test_analytic_gradient_matches_finite_differences() -> None:
    x, t_x, T = btyd.simulate_bgnbd(TRUE, 300, WEEKS, seed=3)
    rows = btyd._RFMRows.build(x.astype(float), t_x, T)
    weights = np.arange(1.0, 301.0)
    theta = np.log([0.7, 3.0, 1.3, 2.2])

    def total(th: FloatArray) -> float:
        ll, _ = btyd._bgnbd_terms(*np.exp(th), rows, weights, with_grad=False)
        return float(weights @ ll)

    _, grad = btyd._bgnbd_terms(*np.exp(theta), rows, weights, with_grad=True)
    assert grad is not None
    step = 1e-6
    numeric = [(total(theta + step * e) - total(theta - step * e)) / (2 * step) for e in np.eye(4)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------


def test_fit_recovers_cdnow_like_parameters(
    cdnow_like: tuple[IntArray, FloatArray, FloatArray],
) -> None:
    x, t_x, T = cdnow_like
    fit = btyd.fit_bgnbd(x, t_x, T, time_unit="week")
    assert fit.converged
    assert fit.n_customers == 5000 and fit.time_unit == "week"
    ll_true = btyd.bgnbd_log_likelihood(TRUE.as_array(), x, t_x, T)
    # A maximum-likelihood fit can never be worse than the truth; and the truth must sit
    # inside the 99.9% likelihood-ratio confidence region of the fit.
    assert fit.log_likelihood >= ll_true
    assert 2.0 * (fit.log_likelihood - ll_true) < CHI2_4_999
    assert fit.log_likelihood == pytest.approx(
        btyd.bgnbd_log_likelihood(fit.as_array(), x, t_x, T), rel=1e-12
    )
    # r and alpha are well determined at this size; a and b trade off along a ridge, so
    # at 5000 customers only their mean a/(a+b) is checked tightly.
    assert fit.r == pytest.approx(TRUE.r, rel=0.25)
    assert fit.alpha == pytest.approx(TRUE.alpha, rel=0.25)
    assert fit.a / (fit.a + fit.b) == pytest.approx(TRUE.a / (TRUE.a + TRUE.b), rel=0.25)


def test_fit_recovers_every_parameter_on_larger_sample() -> None:
    x, t_x, T = btyd.simulate_bgnbd(TRUE, 20_000, WEEKS, seed=11)
    fit = btyd.fit_bgnbd(x, t_x, T, time_unit="week")
    for name in ("r", "alpha", "a", "b"):
        assert getattr(fit, name) == pytest.approx(getattr(TRUE, name), rel=0.25), name


def test_fit_is_deterministic_and_order_free(
    cdnow_like: tuple[IntArray, FloatArray, FloatArray],
) -> None:
    x, t_x, T = cdnow_like
    first = btyd.fit_bgnbd(x, t_x, T)
    perm = np.random.default_rng(0).permutation(x.size)
    assert btyd.fit_bgnbd(x, t_x, T) == first
    shuffled = btyd.fit_bgnbd(x[perm], t_x[perm], T[perm])
    assert shuffled == first


def test_fit_aggregation_matches_duplicated_data() -> None:
    # Whole-day data has many identical rows; duplicating every customer must not move the
    # estimate, and the log-likelihood must scale exactly with the count.
    x, t_x, T = btyd.simulate_bgnbd(TRUE, 3000, WEEKS, seed=5)
    t_x, T = np.round(t_x * 7) / 7, np.round(T * 7) / 7
    single = btyd.fit_bgnbd(x, t_x, T)
    triple = btyd.fit_bgnbd(np.tile(x, 3), np.tile(t_x, 3), np.tile(T, 3))
    np.testing.assert_allclose(triple.as_array(), single.as_array(), rtol=1e-5)
    assert triple.log_likelihood == pytest.approx(3 * single.log_likelihood, rel=1e-9)
    assert triple.n_customers == 9000


def test_fit_time_unit_only_rescales_alpha(
    cdnow_like: tuple[IntArray, FloatArray, FloatArray],
) -> None:
    x, t_x, T = cdnow_like
    weeks = btyd.fit_bgnbd(x, t_x, T, time_unit="week")
    days = btyd.fit_bgnbd(x, t_x * 7, T * 7, time_unit="day")
    assert days.alpha == pytest.approx(7 * weeks.alpha, rel=1e-4)
    for name in ("r", "a", "b"):
        assert getattr(days, name) == pytest.approx(getattr(weeks, name), rel=1e-4)


def test_fit_warm_start_and_penalizer(
    cdnow_like: tuple[IntArray, FloatArray, FloatArray],
) -> None:
    x, t_x, T = cdnow_like
    plain = btyd.fit_bgnbd(x, t_x, T)
    warm = btyd.fit_bgnbd(x, t_x, T, initial=plain)
    np.testing.assert_allclose(warm.as_array(), plain.as_array(), rtol=1e-5)
    penalised = btyd.fit_bgnbd(x, t_x, T, penalizer=0.5)
    # The penalty pulls log-parameters towards 0 and can only lower the raw likelihood.
    assert np.sum(np.log(penalised.as_array()) ** 2) < np.sum(np.log(plain.as_array()) ** 2)
    assert penalised.log_likelihood <= plain.log_likelihood


def test_fit_flags_degenerate_optimum() -> None:
    # Everyone buys steadily right up to the observation time, so nobody ever seems to
    # drop out: the likelihood improves forever as a -> 0 and the fit must say so.
    x = np.arange(1.0, 41.0)
    ages = np.full(40, 50.0)
    degenerate = btyd.fit_bgnbd(x, ages, ages)
    assert not degenerate.converged
    assert degenerate.a < 1e-6
    regularised = btyd.fit_bgnbd(x, ages, ages, penalizer=0.01)
    assert regularised.converged


def test_fit_rejects_unusable_data() -> None:
    with pytest.raises(ValueError, match="at least"):
        btyd.fit_bgnbd([1, 2, 0], [3.0, 4.0, 0.0], [5.0, 5.0, 5.0])
    with pytest.raises(ValueError, match="no customer has a repeat purchase"):
        btyd.fit_bgnbd(np.zeros(50), np.zeros(50), np.full(50, 10.0))
    with pytest.raises(ValueError, match="must not exceed"):
        btyd.fit_bgnbd(np.ones(20), np.full(20, 11.0), np.full(20, 10.0))
    with pytest.raises(ValueError, match="integers"):
        btyd.fit_bgnbd(np.full(20, 1.5), np.ones(20), np.full(20, 10.0))
    with pytest.raises(ValueError, match="same length"):
        btyd.fit_bgnbd(np.ones(20), np.ones(19), np.full(20, 10.0))


def test_fit_many_customers_is_fast() -> None:
    # Whole-day histories for 300k customers observed at one date: aggregation collapses
    # them, so the fit takes well under a few seconds (1M takes about 1 s on a laptop core).
    rng = np.random.default_rng(1)
    params = btyd.BGNBDParams(0.24, 4.41 * 7, 0.79, 2.43, 0.0, 0)
    ages = rng.integers(1, 3 * 365, 300_000).astype(float)
    x, t_x, T = btyd.simulate_bgnbd(params, ages.size, ages, seed=2)
    started = time.perf_counter()
    fit = btyd.fit_bgnbd(x, np.floor(t_x), T)
    assert time.perf_counter() - started < 10.0
    assert fit.converged
    assert fit.r == pytest.approx(0.24, rel=0.1)
    assert fit.alpha == pytest.approx(4.41 * 7, rel=0.15)


# --------------------------------------------------------------------------------------
# Simulator
# --------------------------------------------------------------------------------------


def test_simulator_matches_event_level_simulation(
    event_sim: tuple[IntArray, FloatArray, IntArray, npt.NDArray[np.bool_]],
) -> None:
    ev_x, ev_tx, _, _ = event_sim
    x, t_x, T = btyd.simulate_bgnbd(TRUE, ev_x.size, WEEKS, seed=8)
    assert np.all(T == WEEKS) and np.all((t_x >= 0) & (t_x <= T))
    assert np.all(t_x[x == 0] == 0) and np.all(t_x[x > 0] > 0)
    for stat in (np.mean, lambda v: np.mean(v == 0), lambda v: np.mean(v >= 5)):
        a, b = float(stat(x)), float(stat(ev_x))
        assert a == pytest.approx(b, rel=0.03), (a, b)
    assert float(np.mean(t_x)) == pytest.approx(float(np.mean(ev_tx)), rel=0.03)
    # The mean repeat count is exactly what the closed-form E[X(T)] predicts.
    assert float(np.mean(x)) == pytest.approx(
        float(btyd.expected_purchases_new(TRUE, WEEKS)), rel=0.03
    )


def test_simulator_is_reproducible() -> None:
    first = btyd.simulate_bgnbd(TRUE, 100, [10.0] * 50 + [20.0] * 50, seed=1)
    second = btyd.simulate_bgnbd(TRUE, 100, [10.0] * 50 + [20.0] * 50, seed=1)
    for left, right in zip(first, second, strict=True):
        np.testing.assert_array_equal(left, right)
    assert np.all(first[1][50:] <= 20.0) and np.all(first[1][:50] <= 10.0)


# --------------------------------------------------------------------------------------
# P(alive)
# --------------------------------------------------------------------------------------


def test_p_alive_basic_properties() -> None:
    x = np.array([0, 0, 1, 3, 10, 50])
    t_x = np.array([0.0, 0.0, 2.0, 10.0, 30.0, 38.0])
    ages = np.linspace(38.0, 400.0, 50)[:, None]
    prob = btyd.p_alive(TRUE, x, t_x, ages)
    assert prob.shape == (50, 6)
    assert np.all((prob >= 0) & (prob <= 1))
    assert np.all(prob[:, :2] == 1.0)
    assert np.all(np.diff(prob[:, 2:], axis=0) < 0)
    # Very long silences go cleanly to 0, never NaN.
    assert float(btyd.p_alive(TRUE, 500, 10.0, 1e9)) == 0.0
    assert float(btyd.p_alive(TRUE, 3, 10.0, 10.0)) == pytest.approx(
        1.0 / (1.0 + TRUE.a / (TRUE.b + 2))
    )


def test_p_alive_agrees_with_monte_carlo(
    event_sim: tuple[IntArray, FloatArray, IntArray, npt.NDArray[np.bool_]],
) -> None:
    x, t_x, _, alive = event_sim
    prob = btyd.p_alive(TRUE, x, t_x, WEEKS)
    for subset in (x > 0, (x == 2) & (t_x < 10.0), x >= 6):
        mean_alive = float(np.mean(alive[subset]))
        standard_error = math.sqrt(mean_alive * (1 - mean_alive) / subset.sum())
        assert abs(float(np.mean(prob[subset])) - mean_alive) < 4 * standard_error + 1e-3


# --------------------------------------------------------------------------------------
# Expected purchases
# --------------------------------------------------------------------------------------


def test_expected_purchases_shape_and_monotonicity() -> None:
    horizons = np.linspace(0.0, 200.0, 41)[:, None]
    x = np.array([0, 1, 2, 7, 30])
    t_x = np.array([0.0, 5.0, 30.0, 38.0, 39.0])
    values = btyd.expected_purchases(TRUE, horizons, x, t_x, WEEKS)
    assert values.shape == (41, 5)
    assert np.all(values[0] == 0.0)
    assert np.all(values >= 0)
    assert np.all(np.diff(values, axis=0) > 0)
    new = btyd.expected_purchases_new(TRUE, horizons[:, 0])
    assert new[0] == 0.0 and np.all(np.diff(new) > 0)
    with pytest.raises(ValueError):
        btyd.expected_purchases(TRUE, -1.0, 1, 1.0, 2.0)


def test_expected_purchases_matches_textbook_hypergeometric_form() -> None:
    # Where the literal formula is still representable, the Euler-transformed evaluation
    # must agree with it.
    params = btyd.BGNBDParams(0.6, 3.0, 2.5, 4.0, 0.0, 0)
    for x, t_x, T, t in [(0, 0.0, 10.0, 5.0), (1, 3.0, 10.0, 20.0), (4, 8.0, 12.0, 3.0)]:
        r, alpha, a, b = params.as_array()
        z = t / (alpha + T + t)
        literal = (
            (a + b + x - 1)
            / (a - 1)
            * (
                1
                - ((alpha + T) / (alpha + T + t)) ** (r + x)
                * special.hyp2f1(r + x, b + x, a + b + x - 1, z)
            )
        )
        if x > 0:
            literal /= 1 + a / (b + x - 1) * ((alpha + T) / (alpha + t_x)) ** (r + x)
        got = float(btyd.expected_purchases(params, t, x, t_x, T))
        assert got == pytest.approx(literal, rel=1e-10)


def test_expected_purchases_agrees_with_monte_carlo(
    event_sim: tuple[IntArray, FloatArray, IntArray, npt.NDArray[np.bool_]],
) -> None:
    x, t_x, future, _ = event_sim
    predicted = btyd.expected_purchases(TRUE, 26.0, x, t_x, WEEKS)
    # A fixed profile (x = 0 pins t_x = 0 exactly) and two history-defined groups: for any
    # group chosen by history alone, the mean prediction must equal the mean outcome.
    groups = {
        "x=0, T=39": x == 0,
        "x=2, t_x in [30, 33]": (x == 2) & (t_x >= 30) & (t_x <= 33),
        "everyone": np.ones_like(x, dtype=bool),
    }
    for name, subset in groups.items():
        observed = future[subset]
        standard_error = float(np.std(observed)) / math.sqrt(observed.size)
        gap = abs(float(np.mean(predicted[subset])) - float(np.mean(observed)))
        assert gap < 4 * standard_error, (name, gap, standard_error)
    fixed = float(btyd.expected_purchases(TRUE, 26.0, 0, 0.0, WEEKS))
    assert np.all(predicted[x == 0] == pytest.approx(fixed))


def test_expected_purchases_guards_extreme_inputs() -> None:
    # Large x: the literal formula would give 0 * inf; the transformed one stays finite.
    heavy = btyd.expected_purchases(TRUE, 52.0, 5000, 1000.0, 1000.0)
    rate = (TRUE.r + 5000) / (TRUE.alpha + 1000.0)
    assert 0 < float(heavy) <= rate * 52.0
    # Large a with a horizon far beyond the history: scipy's 2F1 overflows, and the
    # quadrature fallback must still give the (finite) answer, close to its t -> inf limit.
    params = btyd.BGNBDParams(0.5, 1.0, 30.0, 0.5, 0.0, 0)
    far = float(btyd.expected_purchases_new(params, 1e13))
    limit = (params.a + params.b - 1) / (params.a - 1)
    assert far == pytest.approx(limit, rel=1e-3)
    # a = 1 is a removable singularity: values around it must be continuous.
    near = [
        float(
            btyd.expected_purchases(btyd.BGNBDParams(0.5, 3.0, a, 2.0, 0.0, 0), 10.0, 3, 5.0, 20.0)
        )
        for a in (1 - 1e-4, 1 - 1e-7, 1.0, 1 + 1e-7, 1 + 1e-4)
    ]
    assert all(math.isfinite(v) for v in near)
    # Smooth in a: the midpoint of the outer pair matches the value at a = 1.
    assert abs((near[0] + near[4]) / 2 - near[2]) < 1e-8
    # ...and the guarded region just inside 1 +- 1e-6 continues the same straight line.
    slope = (near[4] - near[0]) / 2e-4
    assert abs(near[1] - near[2] + slope * 1e-7) < 1e-10
    assert abs(near[3] - near[2] - slope * 1e-7) < 1e-10


# --------------------------------------------------------------------------------------
# P(alive) crossing
# --------------------------------------------------------------------------------------


def test_crossing_agrees_with_p_alive() -> None:
    for x, t_x in [(1, 3.0), (4, 20.0), (25, 38.0)]:
        for threshold in (0.9, 0.5, 0.1):
            crossing = btyd.p_alive_crossing_T(TRUE, x, t_x, threshold, T_max=1e6)
            assert crossing is not None and crossing >= t_x
            if crossing > t_x:
                assert float(btyd.p_alive(TRUE, x, t_x, crossing)) == pytest.approx(threshold)
                assert float(btyd.p_alive(TRUE, x, t_x, crossing * 1.001 + 1e-3)) < threshold
                assert float(btyd.p_alive(TRUE, x, t_x, crossing * 0.999)) > threshold


def test_crossing_edge_cases() -> None:
    assert btyd.p_alive_crossing_T(TRUE, 0, 0.0, 0.5, T_max=1e9) is None
    assert btyd.p_alive_crossing_T(TRUE, 2, 10.0, 0.01, T_max=11.0) is None
    # A threshold above p_alive at the last purchase is crossed immediately.
    at_last = float(btyd.p_alive(TRUE, 1, 5.0, 5.0))
    assert btyd.p_alive_crossing_T(TRUE, 1, 5.0, (1 + at_last) / 2, T_max=100.0) == 5.0
    with pytest.raises(ValueError):
        btyd.p_alive_crossing_T(TRUE, 1, 5.0, 1.0, T_max=100.0)


# --------------------------------------------------------------------------------------
# Gamma-Gamma
# --------------------------------------------------------------------------------------

GG_TRUE = (6.25, 3.74, 15.44)  # the estimates reported for CDNOW by Fader, Hardie & Lee


def simulate_spend(n: int, seed: int) -> tuple[FloatArray, FloatArray]:
    rng = np.random.default_rng(seed)
    p, q, v = GG_TRUE
    x = rng.integers(1, 15, n).astype(float)
    nu = rng.gamma(q, 1.0 / v, n)
    # The mean of x Gamma(p, nu) purchase values is Gamma(p x, rate nu x).
    m = rng.gamma(p * x, 1.0 / (nu * x))
    return x, m


def test_gamma_gamma_recovers_parameters() -> None:
    x, m = simulate_spend(20_000, seed=4)
    # Non-repeat buyers carry no spend information and must simply be ignored.
    fit = btyd.fit_gamma_gamma(np.append(x, [0, 0]), np.append(m, [0.0, 0.0]))
    assert fit.converged and fit.n_customers == 20_000
    ll_true = btyd.gamma_gamma_log_likelihood(GG_TRUE, x, m)
    assert fit.log_likelihood >= ll_true
    assert 2 * (fit.log_likelihood - ll_true) < CHI2_3_999
    for got, want in zip((fit.p, fit.q, fit.v), GG_TRUE, strict=True):
        assert got == pytest.approx(want, rel=0.25)
    population_mean = GG_TRUE[0] * GG_TRUE[2] / (GG_TRUE[1] - 1)
    assert fit.p * fit.v / (fit.q - 1) == pytest.approx(population_mean, rel=0.05)


def test_gamma_gamma_gradient_matches_finite_differences() -> None:
    x, m = simulate_spend(200, seed=9)
    theta = np.log([4.0, 2.5, 10.0])

    def total(th: FloatArray) -> float:
        ll, _ = btyd._gg_terms(*np.exp(th), x, m, with_grad=False)
        return float(ll.sum())

    _, grad = btyd._gg_terms(*np.exp(theta), x, m, with_grad=True)
    assert grad is not None
    numeric = [(total(theta + 1e-6 * e) - total(theta - 1e-6 * e)) / 2e-6 for e in np.eye(3)]
    np.testing.assert_allclose(grad.sum(axis=1), numeric, rtol=1e-5, atol=1e-4)


def test_conditional_expected_value_shrinks_towards_population_mean() -> None:
    params = btyd.GammaGammaParams(*GG_TRUE, log_likelihood=0.0, n_customers=1)
    population = GG_TRUE[0] * GG_TRUE[2] / (GG_TRUE[1] - 1)
    values = btyd.conditional_expected_value(params, [0, 1, 10, 1000], [0.0, 100.0, 100.0, 100.0])
    assert values[0] == pytest.approx(population)
    # More purchases -> closer to the customer's own mean of 100.
    assert population < values[1] < values[2] < values[3] < 100.0
    assert values[3] == pytest.approx(100.0, rel=0.01)
    heavy = btyd.GammaGammaParams(p=1.0, q=0.5, v=1.0, log_likelihood=0.0, n_customers=1)
    assert np.isinf(btyd.conditional_expected_value(heavy, 0, 0.0))


def test_gamma_gamma_rejects_unusable_data() -> None:
    with pytest.raises(ValueError, match="at least"):
        btyd.fit_gamma_gamma([0, 0, 1], [0.0, 0.0, 10.0])
    with pytest.raises(ValueError, match="same length"):
        btyd.fit_gamma_gamma([1, 2], [1.0])
