"""Buy-till-you-die models: BG/NBD for purchase counts and Gamma-Gamma for spend.

The product summarises every customer by three numbers taken from their purchase days
(several purchases on one calendar day count as one purchase day):

* ``x``   - frequency: distinct purchase days minus one, i.e. the number of *repeat* days;
* ``t_x`` - recency: time from the first to the last purchase day;
* ``T``   - age: time from the first purchase to the moment of observation.

and, for the spend model, ``m`` - the mean per-day spend over the repeat days (0 when x = 0).

Callers divide ``t_x`` and ``T`` by the chosen time unit (1 for days, 7 for weeks) before
calling anything here; the functions are unit-agnostic and simply work in whatever unit
they are given. The fitted parameters record the unit name so that predictions are later
made on the same scale.

The BG/NBD model (Fader, Hardie & Lee, 2005, "Counting your customers the easy way")
says that while a customer is alive they buy as a Poisson process with rate lambda, and
after every repeat purchase they leave for good with probability p. Across customers,
lambda ~ Gamma(r, alpha) (shape, rate) and p ~ Beta(a, b). The Gamma-Gamma model
(Fader, Hardie & Lee, 2005, "RFM and CLV") says a customer's purchase values are
Gamma(p, nu) with nu ~ Gamma(q, v) across customers, independent of the purchase process.

Everything is vectorised with numpy, and the likelihoods are evaluated in log space so
that customers with hundreds of repeat purchases or very long histories neither overflow
nor underflow. Nothing here does I/O or keeps state, so the functions are safe to call
from any thread or stream processor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special

__all__ = [
    "MIN_CUSTOMERS",
    "BGNBDParams",
    "GammaGammaParams",
    "bgnbd_log_likelihood",
    "conditional_expected_value",
    "expected_purchases",
    "expected_purchases_new",
    "fit_bgnbd",
    "fit_gamma_gamma",
    "gamma_gamma_log_likelihood",
    "p_alive",
    "p_alive_crossing_T",
    "simulate_bgnbd",
]

FloatArray = npt.NDArray[np.float64]

MIN_CUSTOMERS = 10
"""Default smallest number of customers a fit accepts.

The BG/NBD has four parameters and Gamma-Gamma three; with fewer customers than this the
likelihood surface is so flat that the "estimate" is mostly the starting point, and a
confident-looking number would be worse than a clear error.
"""

# Log-parameters are kept inside these bounds during optimisation. exp(+-20) spans
# 2e-9 .. 5e8, far wider than any sensible rate or Beta shape, but it stops the optimiser
# from wandering to infinity on degenerate data (where the likelihood keeps improving as a
# parameter grows without limit); such fits are then flagged as not converged.
_LOG_BOUND = 20.0

# A fitted parameter beyond 1e-6 .. 1e6 means the likelihood kept improving towards the
# edge of the parameter space (e.g. a -> 0 when nobody seems to drop out): the optimiser
# may report success, but the numbers describe a degenerate limit, so we say
# "not converged" and let the caller decide (usually: add a small penalizer).
_LOG_EDGE = math.log(1e6)

# Below this distance from a = 1 the closed-form expectation divides two tiny numbers;
# we interpolate between a = 1 - h and a = 1 + h instead (the function is smooth in a).
_A_NEAR_ONE = 1e-6


# --------------------------------------------------------------------------------------
# Parameter containers
# --------------------------------------------------------------------------------------


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


@dataclass(frozen=True)
class BGNBDParams:
    """Fitted BG/NBD population parameters.

    ``r`` and ``alpha`` are the shape and rate of the Gamma distribution of purchase rates
    (so the average customer buys r / alpha times per ``time_unit`` while alive); ``a`` and
    ``b`` are the Beta shapes of the per-purchase drop-out probability (mean a / (a + b)).
    ``log_likelihood`` and ``n_customers`` are kept so that fits on different data or
    periods can be compared; ``converged`` is False when the optimiser stopped early or a
    parameter ran off towards 0 or infinity (outside 1e-6 .. 1e6), in which case the numbers
    describe a degenerate limit and should not be trusted blindly.
    The class is frozen because parameters are shared between threads and cached.
    """

    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    n_customers: int
    time_unit: str = "day"
    converged: bool = True

    def __post_init__(self) -> None:
        for name in ("r", "alpha", "a", "b"):
            _check_positive(name, getattr(self, name))

    def as_array(self) -> FloatArray:
        """The four model parameters as ``[r, alpha, a, b]``, the order the maths uses."""
        return np.array([self.r, self.alpha, self.a, self.b], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (Python floats/ints/str/bool only) for storage or APIs."""
        out = asdict(self)
        for key in ("r", "alpha", "a", "b", "log_likelihood"):
            out[key] = float(out[key])
        out["n_customers"] = int(out["n_customers"])
        out["time_unit"] = str(out["time_unit"])
        out["converged"] = bool(out["converged"])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BGNBDParams:
        """Rebuild parameters from :meth:`to_dict` output; unknown keys are ignored so
        that older readers survive newer writers."""
        return cls(
            r=float(data["r"]),
            alpha=float(data["alpha"]),
            a=float(data["a"]),
            b=float(data["b"]),
            log_likelihood=float(data.get("log_likelihood", float("nan"))),
            n_customers=int(data.get("n_customers", 0)),
            time_unit=str(data.get("time_unit", "day")),
            converged=bool(data.get("converged", True)),
        )


@dataclass(frozen=True)
class GammaGammaParams:
    """Fitted Gamma-Gamma spend parameters.

    A customer's purchase values are Gamma(shape ``p``, rate nu); nu varies across customers
    as Gamma(shape ``q``, rate ``v``). The population mean spend per purchase is
    p * v / (q - 1) (finite only when q > 1).
    """

    p: float
    q: float
    v: float
    log_likelihood: float
    n_customers: int
    converged: bool = True

    def __post_init__(self) -> None:
        for name in ("p", "q", "v"):
            _check_positive(name, getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict for storage or APIs."""
        return {
            "p": float(self.p),
            "q": float(self.q),
            "v": float(self.v),
            "log_likelihood": float(self.log_likelihood),
            "n_customers": int(self.n_customers),
            "converged": bool(self.converged),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GammaGammaParams:
        """Rebuild parameters from :meth:`to_dict` output."""
        return cls(
            p=float(data["p"]),
            q=float(data["q"]),
            v=float(data["v"]),
            log_likelihood=float(data.get("log_likelihood", float("nan"))),
            n_customers=int(data.get("n_customers", 0)),
            converged=bool(data.get("converged", True)),
        )


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def _as_f64(values: npt.ArrayLike) -> FloatArray:
    return np.asarray(values, dtype=np.float64)


def _validate_rfm(
    x: npt.ArrayLike, t_x: npt.ArrayLike, T: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Turn fit inputs into equal-length 1-D float arrays and reject impossible rows.

    Fitting on corrupt summaries (negative ages, recency after the observation time,
    fractional repeat counts) would silently produce nonsense parameters, so we fail loudly.
    """
    xa = np.atleast_1d(_as_f64(x)).ravel()
    ta = np.atleast_1d(_as_f64(t_x)).ravel()
    Ta = np.atleast_1d(_as_f64(T)).ravel()
    if not (xa.shape == ta.shape == Ta.shape):
        raise ValueError(
            f"x, t_x and T must have the same length, got {xa.size}, {ta.size}, {Ta.size}"
        )
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ta)) and np.all(np.isfinite(Ta))):
        raise ValueError("x, t_x and T must all be finite")
    if np.any(xa < 0) or np.any(xa != np.floor(xa)):
        raise ValueError("x (repeat purchase days) must be non-negative integers")
    if np.any(ta < 0) or np.any(Ta < 0):
        raise ValueError("t_x and T must be non-negative")
    # A tiny tolerance absorbs floating-point noise from dividing day counts by time_unit.
    if np.any(ta > Ta * (1.0 + 1e-12) + 1e-12):
        raise ValueError("t_x (recency) must not exceed T (customer age)")
    # Recency carries no information without repeat purchases; zero it so identical
    # non-repeaters collapse into one aggregated row.
    ta = np.where(xa > 0, np.minimum(ta, Ta), 0.0)
    return xa, ta, Ta


def _aggregate(
    x: FloatArray, t_x: FloatArray, T: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Collapse identical (x, t_x, T) rows into unique rows plus a count weight.

    Real summaries are built from whole days and cohorts share observation dates, so a
    million customers typically shrink to a few tens of thousands of distinct rows; the
    likelihood (and its gradient) is then evaluated once per distinct row. A lexicographic
    sort keeps the result deterministic, which keeps the whole fit deterministic.
    """
    order = np.lexsort((T, t_x, x))
    xs, ts, Ts = x[order], t_x[order], T[order]
    new = np.ones(xs.size, dtype=bool)
    new[1:] = (xs[1:] != xs[:-1]) | (ts[1:] != ts[:-1]) | (Ts[1:] != Ts[:-1])
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, xs.size)).astype(np.float64)
    return xs[starts], ts[starts], Ts[starts], counts


# --------------------------------------------------------------------------------------
# BG/NBD likelihood
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RFMRows:
    """Customer rows prepared once per fit so each likelihood evaluation is cheap.

    The gamma/beta/digamma terms depend on x alone, and x takes few distinct values even
    among hundreds of thousands of rows, so those special functions are evaluated once per
    distinct x and broadcast back through ``x_index``; that is most of the cost saved.
    """

    x: FloatArray
    t_x: FloatArray
    T: FloatArray
    repeat: npt.NDArray[np.bool_]
    x_values: FloatArray
    x_index: npt.NDArray[np.intp]

    @classmethod
    def build(cls, x: FloatArray, t_x: FloatArray, T: FloatArray) -> _RFMRows:
        x_values, x_index = np.unique(x, return_inverse=True)
        return cls(x, t_x, T, x > 0, x_values, x_index.ravel())


def _bgnbd_terms(
    r: float,
    alpha: float,
    a: float,
    b: float,
    rows: _RFMRows,
    weights: FloatArray | None,
    with_grad: bool,
) -> tuple[FloatArray, FloatArray | None]:
    """Per-row log-likelihood and (optionally) the weighted gradient sum w.r.t. the
    log-parameters (log r, log alpha, log a, log b).

    The likelihood of one customer is

        B(a, b+x)/B(a, b) * G(r+x)/G(r) * alpha^r * [ (alpha+T)^-(r+x)
                + [x > 0] * a/(b+x-1) * (alpha+t_x)^-(r+x) ]

    where the first bracket term is "still alive at T" and the second "left right after
    the last purchase" (using B(a+1, b+x-1) = B(a, b+x) * a/(b+x-1)). Each piece is a log,
    and the bracket is a log-sum-exp, so nothing overflows for large x or T. For x = 0
    the second term does not exist (nobody can leave before a repeat purchase), which we
    encode as log 0 = -inf so that logaddexp returns the first term exactly.

    The gradient is analytic (digamma functions) and taken with respect to the
    log-parameters because that is what the optimiser works on; an exact gradient makes
    L-BFGS-B converge in a few dozen evaluations instead of hundreds.
    """
    x, t_x, T, repeat = rows.x, rows.t_x, rows.T, rows.repeat
    xv, xi = rows.x_values, rows.x_index
    rx = r + x
    log_alpha_T = np.log(alpha + T)
    log_alpha_tx = np.log(alpha + t_x)
    b_x_1 = np.where(repeat, b + x - 1.0, 1.0)  # b+x-1 only matters (and is > 0) for x > 0
    term_alive = -rx * log_alpha_T
    with np.errstate(divide="ignore"):
        term_dead = np.where(repeat, math.log(a) - np.log(b_x_1) - rx * log_alpha_tx, -np.inf)
    log_bracket = np.logaddexp(term_alive, term_dead)
    # Terms depending on x only, evaluated per distinct x.
    x_part = (
        special.gammaln(r + xv)
        - special.gammaln(r)
        + r * math.log(alpha)
        + special.betaln(a, b + xv)
        - special.betaln(a, b)
    )
    ll = x_part[xi] + log_bracket
    if not with_grad:
        return ll, None

    w = np.ones_like(x) if weights is None else weights
    # Posterior weights of the two explanations (alive vs. left after the last purchase).
    w_dead = np.exp(term_dead - log_bracket)
    w_alive = 1.0 - w_dead
    psi_abx = special.digamma(a + b + xv)
    psi_ab = float(special.digamma(a + b))
    # Per-distinct-x parts of each derivative, summed with the weights of their rows.
    wx = np.bincount(xi, weights=w, minlength=xv.size)
    d_r_x = special.digamma(r + xv) - special.digamma(r) + math.log(alpha)
    d_a_x = psi_ab - psi_abx
    d_b_x = special.digamma(b + xv) - psi_abx - special.digamma(b) + psi_ab
    d_r = float(wx @ d_r_x) - float(w @ (w_alive * log_alpha_T + w_dead * log_alpha_tx))
    d_alpha = r / alpha * float(w.sum()) - float(
        w @ (rx * (w_alive / (alpha + T) + w_dead / (alpha + t_x)))
    )
    d_a = float(wx @ d_a_x) + float(w @ w_dead) / a
    d_b = float(wx @ d_b_x) - float(w @ (w_dead / b_x_1))
    grad = np.array([r * d_r, alpha * d_alpha, a * d_a, b * d_b], dtype=np.float64)
    return ll, grad


def bgnbd_log_likelihood(
    params_array: Sequence[float] | npt.ArrayLike,
    x: npt.ArrayLike,
    t_x: npt.ArrayLike,
    T: npt.ArrayLike,
    *,
    weights: npt.ArrayLike | None = None,
) -> float:
    """Total BG/NBD log-likelihood of ``(r, alpha, a, b)`` over all customers.

    ``weights`` (optional) counts how many customers each row stands for, so aggregated
    data give the same number as the raw rows. The value is the sum, not the mean, so it can
    be compared directly between parameter sets on the same data (likelihood-ratio tests).
    Returns -inf for non-positive parameters rather than raising, so it can be used as an
    objective by generic optimisers.
    """
    r, alpha, a, b = (float(v) for v in np.asarray(params_array, dtype=np.float64).ravel())
    if min(r, alpha, a, b) <= 0.0:
        return float("-inf")
    xa, ta, Ta = np.broadcast_arrays(*(np.atleast_1d(_as_f64(v)).ravel() for v in (x, t_x, T)))
    ll, _ = _bgnbd_terms(r, alpha, a, b, _RFMRows.build(xa, ta, Ta), None, with_grad=False)
    if weights is None:
        return float(np.sum(ll))
    return float(np.dot(np.atleast_1d(_as_f64(weights)).ravel(), ll))


# --------------------------------------------------------------------------------------
# Optimisation helpers
# --------------------------------------------------------------------------------------


Objective = Callable[[FloatArray], tuple[float, FloatArray]]


def _minimise(objective: Objective, theta0: FloatArray) -> tuple[FloatArray, bool]:
    """Minimise a smooth objective over log-parameters, deterministically.

    L-BFGS-B with the analytic gradient does almost all fits. If it reports failure (which
    happens on flat or ridge-shaped surfaces where the line search stalls), Nelder-Mead,
    which needs no gradient, is run from where it stopped, and L-BFGS-B polishes the result.
    Every step is deterministic, so the same data always give the same parameters.
    Returns the best point and whether we trust it as an interior optimum (optimiser
    success and every parameter within ``_LOG_EDGE``).
    """
    bounds = [(-_LOG_BOUND, _LOG_BOUND)] * theta0.size
    options = {"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9}
    from scipy import optimize  # fitting only: keeps queries' start-up light

    res = optimize.minimize(
        objective, theta0, jac=True, method="L-BFGS-B", bounds=bounds, options=options
    )
    best_x = np.asarray(res.x, dtype=np.float64)
    success = bool(res.success)
    if not success:
        nm = optimize.minimize(
            lambda th: objective(np.clip(th, -_LOG_BOUND, _LOG_BOUND))[0],
            best_x,
            method="Nelder-Mead",
            options={"maxiter": 20000, "xatol": 1e-9, "fatol": 1e-14, "adaptive": True},
        )
        start = np.clip(np.asarray(nm.x, dtype=np.float64), -_LOG_BOUND, _LOG_BOUND)
        polish = optimize.minimize(
            objective, start, jac=True, method="L-BFGS-B", bounds=bounds, options=options
        )
        best_x = np.asarray(polish.x, dtype=np.float64)
        success = bool(polish.success)
    at_edge = bool(np.any(np.abs(best_x) > _LOG_EDGE))
    return best_x, success and not at_edge


# --------------------------------------------------------------------------------------
# BG/NBD fitting
# --------------------------------------------------------------------------------------


def fit_bgnbd(
    x: npt.ArrayLike,
    t_x: npt.ArrayLike,
    T: npt.ArrayLike,
    *,
    time_unit: str = "day",
    penalizer: float = 0.0,
    initial: BGNBDParams | Sequence[float] | None = None,
    min_customers: int = MIN_CUSTOMERS,
) -> BGNBDParams:
    """Maximum-likelihood BG/NBD fit.

    Identical (x, t_x, T) rows are aggregated first, which makes a million customers cost
    about as much as their few thousand distinct histories. The optimiser works on
    log-parameters (so positivity is automatic and scales are comparable) and minimises the
    *mean* negative log-likelihood, so tolerances and ``penalizer`` mean the same thing for
    100 or 10 million customers.

    ``penalizer`` adds ``penalizer * sum(log(param)**2)``: a gentle pull of every
    parameter towards 1 on a log scale. It is off by default; use a small value (0.001 -
    0.1) for tiny or degenerate cohorts where the unpenalised optimum runs off towards 0 or
    infinity. The reported ``log_likelihood`` is always the unpenalised one.

    ``initial`` is an optional starting point (a previous fit or ``(r, alpha, a, b)``),
    useful for warm-starting periodic refits. Raises ``ValueError`` when there are fewer
    than ``min_customers`` customers or nobody made a repeat purchase (then drop-out cannot
    be told apart from a low purchase rate and the model is not identified).
    """
    xa, ta, Ta = _validate_rfm(x, t_x, T)
    n = int(xa.size)
    if penalizer < 0 or not math.isfinite(penalizer):
        raise ValueError(f"penalizer must be a finite non-negative number, got {penalizer!r}")
    if n < min_customers:
        raise ValueError(f"BG/NBD needs at least {min_customers} customers to fit, got {n}")
    if not np.any(xa > 0):
        raise ValueError(
            "BG/NBD cannot be fitted: no customer has a repeat purchase (all x == 0), so "
            "purchase rate and drop-out are not identifiable"
        )

    ux, ut, uT, w = _aggregate(xa, ta, Ta)
    rows = _RFMRows.build(ux, ut, uT)
    total = float(n)

    def objective(theta: FloatArray) -> tuple[float, FloatArray]:
        r, alpha, a, b = np.exp(theta)
        ll, grad = _bgnbd_terms(r, alpha, a, b, rows, w, with_grad=True)
        assert grad is not None
        value = -float(np.dot(w, ll)) / total + penalizer * float(np.dot(theta, theta))
        g = -grad / total + 2.0 * penalizer * theta
        if not math.isfinite(value):
            # Only reachable at absurd parameter values; steer the line search away.
            return 1e300, np.zeros_like(theta)
        return value, g

    theta0 = _initial_theta(initial, ux, uT, w)
    theta, converged = _minimise(objective, theta0)
    r, alpha, a, b = (float(v) for v in np.exp(theta))
    ll_total = bgnbd_log_likelihood((r, alpha, a, b), ux, ut, uT, weights=w)
    return BGNBDParams(
        r=r,
        alpha=alpha,
        a=a,
        b=b,
        log_likelihood=ll_total,
        n_customers=n,
        time_unit=time_unit,
        converged=converged,
    )


def _initial_theta(
    initial: BGNBDParams | Sequence[float] | None,
    x: FloatArray,
    T: FloatArray,
    w: FloatArray,
) -> FloatArray:
    """Starting point in log space.

    Without a user guess we start at r = 1, a = 1, b = 1 and pick alpha so that the mean
    purchase rate r/alpha matches the observed repeat purchases per unit of customer age.
    Getting the scale of alpha right matters because it is the only parameter that carries
    the time unit (days vs weeks differ by a factor of 7).
    """
    if initial is not None:
        guess = (
            initial.as_array()
            if isinstance(initial, BGNBDParams)
            else np.asarray(initial, dtype=np.float64).ravel()
        )
        if guess.size != 4 or np.any(~np.isfinite(guess)) or np.any(guess <= 0):
            raise ValueError("initial must be four positive numbers (r, alpha, a, b)")
        return np.clip(np.log(guess), -_LOG_BOUND + 1, _LOG_BOUND - 1)
    exposure = float(np.dot(w, T))
    repeats = float(np.dot(w, x))
    alpha0 = exposure / repeats if repeats > 0 and exposure > 0 else 1.0
    alpha0 = min(max(alpha0, 1e-3), 1e6)
    return np.log(np.array([1.0, alpha0, 1.0, 1.0], dtype=np.float64))


# --------------------------------------------------------------------------------------
# BG/NBD predictions
# --------------------------------------------------------------------------------------


def p_alive(
    params: BGNBDParams, x: npt.ArrayLike, t_x: npt.ArrayLike, T: npt.ArrayLike
) -> FloatArray:
    """Probability that a customer with history (x, t_x, T) has not yet dropped out.

    It is the share of the likelihood explained by "still alive":
    1 / (1 + [x > 0] * a/(b+x-1) * ((alpha+T)/(alpha+t_x))^(r+x)). Customers without repeat
    purchases are alive with certainty in BG/NBD (drop-out only happens right after a
    repeat purchase), so they get exactly 1. The ratio is formed in log space and passed
    through a logistic function, so very long silences give a clean 0 instead of overflow.
    Inputs broadcast; a 0-d array is returned for scalar inputs.
    """
    xa, ta, Ta = np.broadcast_arrays(_as_f64(x), _as_f64(t_x), _as_f64(T))
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    repeat = xa > 0
    b_x_1 = np.where(repeat, b + xa - 1.0, 1.0)
    log_odds_dead = (
        math.log(a) - np.log(b_x_1) + (r + xa) * (np.log(alpha + Ta) - np.log(alpha + ta))
    )
    prob = special.expit(-log_odds_dead)
    return np.asarray(np.where(repeat, prob, 1.0), dtype=np.float64)


def _remaining_purchases_if_alive(
    r: float, alpha: float, a: float, b: float, x: FloatArray, T: FloatArray, t: FloatArray
) -> FloatArray:
    """Expected purchases in (T, T+t] for a customer known to be alive at T.

    The closed form (FHL 2005, eq. 10 without the P(alive) factor) is

        (a+b+x-1)/(a-1) * [1 - ((alpha+T)/(alpha+T+t))^(r+x) * 2F1(r+x, b+x; a+b+x-1; z)]

    with z = t/(alpha+T+t). Evaluated literally it breaks down: for large x the 2F1 value
    overflows while the power underflows (0 * inf = nan); on a random stress grid (x up to
    10^4, horizons up to 1e12 * (alpha+T)) that happened for about a third of the inputs.
    Guards, in order:

    1. Euler's transformation 2F1(A,B;C;z) = (1-z)^(C-A-B) 2F1(C-A, C-B; C; z) turns the
       product into (1-z)^(a-1) * 2F1(a+b-1-r, a-1; a+b+x-1; z). The new upper parameters
       no longer grow with x, so the series converges quickly. Against a 40-digit mpmath
       reference (random r, a, b in 0.03 .. 100, x up to 10^4) it agrees to ~1e-15 for
       horizons up to ~1e8 * (alpha+T), degrading to ~1e-5 only for absurd horizons.
       log(1-z) is computed as log(alpha+T) - log(alpha+T+t), which stays exact even when
       z rounds to 1.
    2. If scipy's 2F1 still returns a non-finite value (seen only for a >~ 14 with
       t >~ 1e5 * (alpha+T), where the transformed series itself overflows), that element
       is computed by adaptive quadrature of the equivalent integral
       E_p[(1 - ((alpha+T)/(alpha+T+p t))^(r+x)) / p] with p ~ Beta(a, b+x).
    3. At a == 1 the formula is 0/0 (the limit exists). Within 1e-6 of 1 we evaluate at
       a = 1 -+ 1e-6 and interpolate linearly; rounding then costs ~1e-10 relative and the
       interpolation error is smaller still.
    """
    if abs(a - 1.0) < _A_NEAR_ONE:
        lo_a, hi_a = 1.0 - _A_NEAR_ONE, 1.0 + _A_NEAR_ONE
        lo = _remaining_closed_form(r, alpha, lo_a, b, x, T, t)
        hi = _remaining_closed_form(r, alpha, hi_a, b, x, T, t)
        frac = (a - lo_a) / (hi_a - lo_a)
        return lo + frac * (hi - lo)
    return _remaining_closed_form(r, alpha, a, b, x, T, t)


def _remaining_closed_form(
    r: float, alpha: float, a: float, b: float, x: FloatArray, T: FloatArray, t: FloatArray
) -> FloatArray:
    """Guards 1 and 2 of :func:`_remaining_purchases_if_alive` (requires a != 1)."""
    log_one_minus_z = np.log(alpha + T) - np.log(alpha + T + t)
    z = t / (alpha + T + t)
    c = a + b + x - 1.0
    with np.errstate(all="ignore"):
        hyp = special.hyp2f1(a + b - 1.0 - r, a - 1.0, c, z)
        tail = np.exp((a - 1.0) * log_one_minus_z) * hyp
        out = np.asarray(c / (a - 1.0) * (1.0 - tail), dtype=np.float64)
    bad = ~np.isfinite(out)
    if np.any(bad):
        idx = np.flatnonzero(bad)
        for i in idx:
            out.flat[i] = _remaining_by_quadrature(
                r, alpha, a, b, float(x.flat[i]), float(T.flat[i]), float(t.flat[i])
            )
    return np.where(t > 0, out, 0.0)


def _remaining_by_quadrature(
    r: float, alpha: float, a: float, b: float, x: float, T: float, t: float
) -> float:
    """Slow but robust fallback for :func:`_remaining_purchases_if_alive` (one element).

    Given alive at T, lambda's posterior is Gamma(r+x, alpha+T) and p's is Beta(a, b+x);
    for fixed (lambda, p) the expected future purchases are (1 - exp(-lambda p t)) / p.
    Averaging over lambda in closed form leaves a one-dimensional integral over p, which
    quad evaluates with the Beta density formed in log space (no overflow for huge x).
    """
    if t <= 0:
        return 0.0
    if not math.isfinite(t):
        return math.inf if a <= 1 else (a + b + x - 1.0) / (a - 1.0)
    scale = t / (alpha + T)
    shape = r + x
    b_post = b + x
    log_norm = special.betaln(a, b_post)

    def integrand(p: float) -> float:
        if p <= 0.0 or p >= 1.0:
            return 0.0
        gain = -math.expm1(-shape * math.log1p(p * scale)) / p
        log_dens = (a - 1.0) * math.log(p) + (b_post - 1.0) * math.log1p(-p) - log_norm
        return gain * math.exp(log_dens)

    mode = (a - 1.0) / (a + b_post - 2.0) if a > 1 and b_post > 1 else 0.5
    knee = 1.0 / (1.0 + shape * scale)
    points = sorted({min(max(v, 1e-12), 1 - 1e-12) for v in (mode, knee)})
    from scipy import integrate  # the rare numerical fallback only

    value, _ = integrate.quad(integrand, 0.0, 1.0, points=points, limit=500)
    return float(value)


def expected_purchases(
    params: BGNBDParams,
    t: npt.ArrayLike,
    x: npt.ArrayLike,
    t_x: npt.ArrayLike,
    T: npt.ArrayLike,
) -> FloatArray:
    """Expected number of purchases in the next ``t`` time units given history (x, t_x, T).

    It is P(alive) times the expected purchases of a customer known to be alive (the
    closed form with the Gaussian hypergeometric function; see
    :func:`_remaining_purchases_if_alive` for the numerical guards). The result is
    non-negative and increasing in ``t``. ``t`` is in the same unit as ``T``; all inputs
    broadcast. When a < 1 the expectation grows without bound as t grows (some customers
    practically never leave), so very long horizons give large numbers on purpose.
    """
    ta_, xa, txa, Ta = np.broadcast_arrays(_as_f64(t), _as_f64(x), _as_f64(t_x), _as_f64(T))
    if np.any(ta_ < 0):
        raise ValueError("t (prediction horizon) must be non-negative")
    alive = p_alive(params, xa, txa, Ta)
    remaining = _remaining_purchases_if_alive(
        params.r, params.alpha, params.a, params.b, xa, Ta, ta_
    )
    return np.asarray(np.maximum(alive * remaining, 0.0), dtype=np.float64)


def expected_purchases_new(params: BGNBDParams, t: npt.ArrayLike) -> FloatArray:
    """Unconditional E[X(t)]: expected repeat purchases in the first ``t`` units of a newly
    acquired customer. It is the conditional formula for a customer with no history
    (x = 0, T = 0), who is alive by definition; used for forecasting new cohorts."""
    ta_ = _as_f64(t)
    if np.any(ta_ < 0):
        raise ValueError("t must be non-negative")
    zeros = np.zeros_like(ta_)
    out = _remaining_purchases_if_alive(
        params.r, params.alpha, params.a, params.b, zeros, zeros, ta_
    )
    return np.asarray(np.maximum(out, 0.0), dtype=np.float64)


def p_alive_crossing_T(
    params: BGNBDParams, x: float, t_x: float, threshold: float, T_max: float
) -> float | None:
    """Earliest age T >= t_x at which p_alive falls to ``threshold``, or None.

    Used to schedule a single timer per customer ("check back when this person is probably
    gone") instead of re-scoring everyone every day. For x > 0, p_alive depends on T only
    through ((alpha+T)/(alpha+t_x))^(r+x), which grows monotonically, so the crossing has a
    closed form (no bisection needed):

        T* = (alpha + t_x) * ((1/threshold - 1) * (b+x-1)/a)^(1/(r+x)) - alpha.

    If p_alive is already below the threshold at T = t_x, t_x is returned. Returns None for
    x = 0 (p_alive stays 1 forever) or when the crossing lies beyond ``T_max``.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be strictly between 0 and 1, got {threshold!r}")
    if x < 0 or t_x < 0:
        raise ValueError("x and t_x must be non-negative")
    if x <= 0:
        return None
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    log_target = math.log1p(-threshold) - math.log(threshold) + math.log(b + x - 1.0)
    log_growth = (log_target - math.log(a)) / (r + x)
    crossing = (alpha + t_x) * math.exp(log_growth) - alpha if log_growth < 700 else math.inf
    crossing = max(crossing, float(t_x))
    if crossing > T_max:
        return None
    return float(crossing)


# --------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------


def simulate_bgnbd(
    params: BGNBDParams,
    n_customers: int,
    T: float | npt.ArrayLike,
    seed: int | np.random.Generator | None = None,
) -> tuple[npt.NDArray[np.int64], FloatArray, FloatArray]:
    """Draw (x, t_x, T) summaries from the BG/NBD generative process.

    Each customer gets lambda ~ Gamma(r, rate alpha) and p ~ Beta(a, b), makes a first
    purchase at time 0, then buys as a Poisson process and leaves right after each repeat
    purchase with probability p. Rather than stepping through events we use two exact
    shortcuts: the number of repeats the customer would make before leaving is
    Geometric(p) (counting the last one), so x = min(Poisson(lambda T), Geometric(p));
    and given n Poisson events in [0, T] their times are uniform, so the x-th one is at
    T * Beta(x, n - x + 1). Time is continuous. Used by tests and for what-if analysis.
    """
    if n_customers < 0:
        raise ValueError("n_customers must be non-negative")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    ages = np.broadcast_to(_as_f64(T), (n_customers,)).astype(np.float64)
    if np.any(ages < 0) or not np.all(np.isfinite(ages)):
        raise ValueError("T must be finite and non-negative")
    lam = rng.gamma(params.r, 1.0 / params.alpha, size=n_customers)
    drop = rng.beta(params.a, params.b, size=n_customers)
    # Beta draws can underflow to exactly 0 for tiny a; numpy's geometric rejects p = 0.
    drop = np.clip(drop, 1e-300, 1.0)
    events = rng.poisson(lam * ages)
    budget = rng.geometric(drop)
    x = np.minimum(events, budget).astype(np.int64)
    has = x > 0
    shape1 = np.where(has, x, 1).astype(np.float64)
    shape2 = np.where(has, events - x + 1, 1).astype(np.float64)
    position = rng.beta(shape1, shape2)
    t_x = np.where(has, ages * position, 0.0)
    return x, t_x, ages


# --------------------------------------------------------------------------------------
# Gamma-Gamma spend model
# --------------------------------------------------------------------------------------


def _gg_terms(
    p: float, q: float, v: float, x: FloatArray, m: FloatArray, with_grad: bool
) -> tuple[FloatArray, FloatArray | None]:
    """Per-customer Gamma-Gamma log-density of the observed mean spend ``m`` over ``x``
    repeat purchases, and its gradient w.r.t. (log p, log q, log v).

    The sum of x Gamma(p, nu) values is Gamma(px, nu), so the mean is Gamma(px, x nu);
    integrating nu ~ Gamma(q, v) out gives

        G(px+q)/(G(px) G(q)) * v^q * m^(px-1) * x^(px) / (v + m x)^(px+q),

    which we take logs of term by term.
    """
    px = p * x
    log_vmx = np.log(v + m * x)
    log_m = np.log(m)
    log_x = np.log(x)
    ll = (
        special.gammaln(px + q)
        - special.gammaln(px)
        - special.gammaln(q)
        + q * math.log(v)
        + (px - 1.0) * log_m
        + px * log_x
        - (px + q) * log_vmx
    )
    if not with_grad:
        return ll, None
    psi_pxq = special.digamma(px + q)
    d_p = x * (psi_pxq - special.digamma(px) + log_m + log_x - log_vmx)
    d_q = psi_pxq - special.digamma(q) + math.log(v) - log_vmx
    d_v = q / v - (px + q) / (v + m * x)
    return ll, np.stack([p * d_p, q * d_q, v * d_v])


def gamma_gamma_log_likelihood(
    params_array: Sequence[float] | npt.ArrayLike, x: npt.ArrayLike, m: npt.ArrayLike
) -> float:
    """Total Gamma-Gamma log-likelihood of ``(p, q, v)`` over customers with x > 0, m > 0.

    Rows without repeat purchases carry no spend information and are skipped, matching
    what :func:`fit_gamma_gamma` uses.
    """
    p, q, v = (float(val) for val in np.asarray(params_array, dtype=np.float64).ravel())
    if min(p, q, v) <= 0.0:
        return float("-inf")
    xa = np.atleast_1d(_as_f64(x)).ravel()
    ma = np.atleast_1d(_as_f64(m)).ravel()
    keep = (xa > 0) & (ma > 0)
    ll, _ = _gg_terms(p, q, v, xa[keep], ma[keep], with_grad=False)
    return float(np.sum(ll))


def fit_gamma_gamma(
    x: npt.ArrayLike,
    m: npt.ArrayLike,
    *,
    penalizer: float = 0.0,
    initial: GammaGammaParams | Sequence[float] | None = None,
    min_customers: int = MIN_CUSTOMERS,
) -> GammaGammaParams:
    """Maximum-likelihood Gamma-Gamma fit on repeat buyers.

    Only customers with x > 0 and m > 0 are used: without a repeat purchase there is no
    repeat spend to learn from, and a zero mean spend has zero density under a Gamma model
    (refund-only days should be cleaned upstream). The model assumes spend is independent
    of purchase frequency; check that correlation before relying on it. ``penalizer`` has
    the same log-scale meaning as in :func:`fit_bgnbd`. ``n_customers`` in the result counts
    the customers actually used. Raises ``ValueError`` when fewer than ``min_customers``
    usable customers remain.
    """
    xa = np.atleast_1d(_as_f64(x)).ravel()
    ma = np.atleast_1d(_as_f64(m)).ravel()
    if xa.shape != ma.shape:
        raise ValueError(f"x and m must have the same length, got {xa.size} and {ma.size}")
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ma))):
        raise ValueError("x and m must be finite")
    if np.any(xa < 0) or np.any(ma < 0):
        raise ValueError("x and m must be non-negative")
    if penalizer < 0 or not math.isfinite(penalizer):
        raise ValueError(f"penalizer must be a finite non-negative number, got {penalizer!r}")
    keep = (xa > 0) & (ma > 0)
    xs, ms = xa[keep], ma[keep]
    n = int(xs.size)
    if n < min_customers:
        raise ValueError(
            f"Gamma-Gamma needs at least {min_customers} repeat buyers with positive spend, got {n}"
        )

    def objective(theta: FloatArray) -> tuple[float, FloatArray]:
        p, q, v = np.exp(theta)
        ll, grad = _gg_terms(p, q, v, xs, ms, with_grad=True)
        assert grad is not None
        value = -float(np.sum(ll)) / n + penalizer * float(np.dot(theta, theta))
        if not math.isfinite(value):
            return 1e300, np.zeros_like(theta)
        return value, -grad.sum(axis=1) / n + 2.0 * penalizer * theta

    if initial is not None:
        guess = (
            np.array([initial.p, initial.q, initial.v], dtype=np.float64)
            if isinstance(initial, GammaGammaParams)
            else np.asarray(initial, dtype=np.float64).ravel()
        )
        if guess.size != 3 or np.any(~np.isfinite(guess)) or np.any(guess <= 0):
            raise ValueError("initial must be three positive numbers (p, q, v)")
    else:
        # Start with a population mean p*v/(q-1) equal to the observed mean spend, so the
        # optimiser begins on the right monetary scale (currency units vary wildly).
        guess = np.array([1.0, 2.0, max(float(np.mean(ms)), 1e-6)], dtype=np.float64)
    theta0 = np.clip(np.log(guess), -_LOG_BOUND + 1, _LOG_BOUND - 1)
    theta, converged = _minimise(objective, theta0)
    p, q, v = (float(val) for val in np.exp(theta))
    return GammaGammaParams(
        p=p,
        q=q,
        v=v,
        log_likelihood=gamma_gamma_log_likelihood((p, q, v), xs, ms),
        n_customers=n,
        converged=converged,
    )


def conditional_expected_value(
    params: GammaGammaParams, x: npt.ArrayLike, m: npt.ArrayLike
) -> FloatArray:
    """Expected spend per future purchase given x repeat purchases with mean spend m.

    The posterior mean (v + m x) p / (p x + q - 1) is a weighted average of the population
    mean p v / (q - 1) and the customer's own mean m, with more weight on m the more
    purchases we have seen; this shrinkage stops one lucky big order from dominating CLV.
    For x = 0 it is the population mean, which is infinite when q <= 1 (returned as inf).
    """
    xa, ma = np.broadcast_arrays(_as_f64(x), _as_f64(m))
    p, q, v = params.p, params.q, params.v
    denom = p * xa + q - 1.0
    safe = denom > 0
    value = (v + ma * xa) * p / np.where(safe, denom, 1.0)
    return np.asarray(np.where(safe, value, np.inf), dtype=np.float64)
