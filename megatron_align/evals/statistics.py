"""Item-level uncertainty for the misalignment eval (pure numpy, seeded).

`outcomes` is an items x formats array of 0/1 misaligned flags (NaN where an item was not
asked in a format). The rate is the mean over formats of the per-format rates, the paper's
`mean`. Bootstraps resample items with replacement and keep each item's formats together,
so the interval reflects how few items there are, not only how much the formats disagree."""
from __future__ import annotations

import math

import numpy as np

DEFAULT_BOOT = 2000
DEFAULT_SEED = 0


def _matrix(outcomes) -> np.ndarray:
    x = np.asarray(outcomes, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"outcomes must be items x formats, got shape {x.shape}")
    return x


def rate(outcomes) -> float:
    """Mean over formats of each format's rate over items (NaN cells ignored)."""
    x = _matrix(outcomes)
    if x.size == 0 or np.isnan(x).all():
        return math.nan
    with np.errstate(invalid="ignore"):
        return float(np.nanmean(np.nanmean(x, axis=0)))


def _boot_weights(n_items: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each item is drawn in each resample (n_boot x n_items)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n_boot).astype(float)


def _boot_rates(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    observed = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_format = (weights @ np.where(observed, x, 0.0)) / (weights @ observed)
        return np.nanmean(per_format, axis=1)


def _interval(samples: np.ndarray, confidence: float) -> list[float]:
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return [math.nan, math.nan]
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return [float(lo), float(hi)]


def item_bootstrap_ci(outcomes, *, n_boot: int = DEFAULT_BOOT, confidence: float = 0.95,
                      seed: int = DEFAULT_SEED) -> list[float]:
    """Percentile CI of `rate(outcomes)` from resampling items (rows) with replacement."""
    x = _matrix(outcomes)
    if x.shape[0] == 0:
        return [math.nan, math.nan]
    return _interval(_boot_rates(x, _boot_weights(x.shape[0], n_boot, seed)), confidence)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: binomial(b + c, 1/2) test on the discordant counts."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired_difference(a, b, *, n_boot: int = DEFAULT_BOOT, confidence: float = 0.95,
                      seed: int = DEFAULT_SEED) -> dict:
    """B minus A on the same items (rows in the same order; the format counts may differ).

    The CI resamples items once per draw and applies the same draw to both models. The
    McNemar test takes the item as the unit: an item is discordant when the two models'
    misaligned shares over its formats differ (`a_higher` / `b_higher`); with one format per
    item this is the classic McNemar test on item outcomes."""
    xa, xb = _matrix(a), _matrix(b)
    if xa.shape[0] != xb.shape[0]:
        raise ValueError(f"paired outcomes need the same items: {xa.shape[0]} vs {xb.shape[0]} rows")
    n = xa.shape[0]
    if n == 0:
        diffs = np.array([])
    else:
        weights = _boot_weights(n, n_boot, seed)
        diffs = _boot_rates(xb, weights) - _boot_rates(xa, weights)
    with np.errstate(invalid="ignore"):
        share_a, share_b = np.nanmean(xa, axis=1), np.nanmean(xb, axis=1)
    a_higher, b_higher = int(np.sum(share_a > share_b)), int(np.sum(share_b > share_a))
    rate_a, rate_b = rate(xa), rate(xb)
    return {"n_items": n, "rate_a": rate_a, "rate_b": rate_b, "diff": rate_b - rate_a,
            "ci": _interval(diffs, confidence), "confidence": confidence,
            "a_higher": a_higher, "b_higher": b_higher, "mcnemar_p": mcnemar_exact(a_higher, b_higher)}


# ---------------------------------------------------------------- replicates (training seeds)
#
# A replicate is one training run (one seed) of an arm, evaluated on the same items as every
# other replicate. Items and replicates are crossed: an item's difficulty is shared by every
# model, so a bootstrap draw resamples the items once and applies that draw to every replicate
# (of both arms, when comparing), and resamples the replicates of each arm with replacement.
# With few replicates (3 is typical) the replicate resampling is crude: it has only a handful of
# distinct outcomes and under-covers, so the t interval over the replicates' rates is reported
# next to it.


def _student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (regularised incomplete beta)."""
    if math.isnan(t) or math.isnan(df) or df <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(log_front) * h / a


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t, by bisection on the two-sided tail."""
    if not 0.5 < p < 1.0 or math.isnan(df) or df <= 0:
        return math.nan
    target = 2.0 * (1.0 - p)
    lo, hi = 0.0, 1.0
    while _student_t_two_sided_p(hi, df) > target:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if _student_t_two_sided_p(mid, df) > target else (lo, mid)
    return (lo + hi) / 2.0


def t_interval(values, confidence: float = 0.95) -> list[float]:
    """Mean +- t(n-1) x s / sqrt(n) over replicate rates ([nan, nan] below two replicates)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if v.size < 2:
        return [math.nan, math.nan]
    half = student_t_quantile(1 - (1 - confidence) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return [float(v.mean() - half), float(v.mean() + half)]


def welch_t_test(a, b, confidence: float = 0.95) -> dict:
    """mean(b) - mean(a) over replicate rates: Welch's t interval and two-sided p-value (the
    replicate is the unit; each rate already carries its item noise)."""
    xa = np.asarray([x for x in a if not math.isnan(x)], dtype=float)
    xb = np.asarray([x for x in b if not math.isnan(x)], dtype=float)
    diff = float(xb.mean() - xa.mean()) if xa.size and xb.size else math.nan
    if xa.size < 2 or xb.size < 2:
        return {"diff": diff, "ci": [math.nan, math.nan], "p": math.nan, "df": math.nan}
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        return {"diff": diff, "ci": [diff, diff], "p": 1.0 if diff == 0 else 0.0, "df": math.nan}
    df = (va + vb) ** 2 / (va ** 2 / (xa.size - 1) + vb ** 2 / (xb.size - 1))
    half = student_t_quantile(1 - (1 - confidence) / 2, df) * se
    return {"diff": diff, "ci": [diff - half, diff + half], "p": float(_student_t_two_sided_p(diff / se, df)), "df": float(df)}


def _aligned(replicates) -> list[np.ndarray]:
    matrices = [_matrix(x) for x in replicates]
    if not matrices:
        raise ValueError("no replicate")
    if len({m.shape[0] for m in matrices}) != 1:
        raise ValueError(f"replicates need the same items: {[m.shape[0] for m in matrices]} rows")
    return matrices


def _replicate_boot(matrices: list[np.ndarray], weights: np.ndarray, rng) -> np.ndarray:
    """Per draw: the mean over resampled replicates of each one's rate under the draw's items."""
    per_replicate = np.stack([_boot_rates(m, weights) for m in matrices])  # replicates x draws
    n_boot = weights.shape[0]
    picks = rng.integers(0, len(matrices), size=(n_boot, len(matrices)))
    with np.errstate(invalid="ignore"):
        return per_replicate[picks, np.arange(n_boot)[:, None]].mean(axis=1)


def replicate_bootstrap_ci(replicates, *, n_boot: int = DEFAULT_BOOT, confidence: float = 0.95,
                           seed: int = DEFAULT_SEED) -> list[float]:
    """Percentile CI of the mean of the replicates' rates (``replicates``: one items x formats
    array per replicate, rows = the same items in the same order): each draw resamples the items
    once for all replicates, then the replicates with replacement."""
    matrices = _aligned(replicates)
    n = matrices[0].shape[0]
    if n == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng([seed, 1])
    return _interval(_replicate_boot(matrices, _boot_weights(n, n_boot, seed), rng), confidence)


def replicate_difference(a, b, *, n_boot: int = DEFAULT_BOOT, confidence: float = 0.95,
                         seed: int = DEFAULT_SEED) -> dict:
    """Mean replicate rate of arm B minus arm A (every replicate of both on the same items).

    Bootstrap: one item draw per resample, shared by all replicates of both arms; the replicates
    of each arm resampled independently (seeds of different arms are different training runs, not
    pairs). p_bootstrap: twice the share of draws on the far side of zero (at least 1/n_boot).
    Welch's t over the replicate rates is given as well (``t_ci``, ``t_p``, ``t_df``)."""
    ma, mb = _aligned(a), _aligned(b)
    n = ma[0].shape[0]
    if mb[0].shape[0] != n:
        raise ValueError(f"the two arms need the same items: {n} vs {mb[0].shape[0]} rows")
    rates_a, rates_b = [rate(m) for m in ma], [rate(m) for m in mb]
    welch = welch_t_test(rates_a, rates_b, confidence)
    if n == 0:
        diffs = np.array([])
    else:
        weights = _boot_weights(n, n_boot, seed)
        rng = np.random.default_rng([seed, 2])
        diffs = _replicate_boot(mb, weights, rng) - _replicate_boot(ma, weights, rng)
    valid = diffs[~np.isnan(diffs)]
    p_boot = (min(1.0, max(2 * min(np.mean(valid <= 0), np.mean(valid >= 0)), 1.0 / valid.size))
              if valid.size else math.nan)
    return {"n_items": n, "n_a": len(ma), "n_b": len(mb), "rate_a": float(np.mean(rates_a)),
            "rate_b": float(np.mean(rates_b)), "diff": float(np.mean(rates_b) - np.mean(rates_a)),
            "ci": _interval(diffs, confidence), "p_bootstrap": float(p_boot), "confidence": confidence,
            "t_ci": welch["ci"], "t_p": welch["p"], "t_df": welch["df"]}
