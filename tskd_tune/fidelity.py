"""Can early stopping be trusted here? The rank correlation between each rung's score and the final score.

ASHA stops a trial at a rung (the grace period, then every ``reduction_factor`` times more epochs) when
its score there ranks low. That is only as good as the agreement between early and final ranks
(ASHA, arXiv 1810.05934; practitioners call it unreliable below about 0.6): over the trials that ran to
the end, the Spearman rank correlation between their score at each rung and their final score says how
far a rung's ranking can be trusted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

TRUST = 0.6
"""Below this rank correlation at the grace period, early stopping is likely to stop the wrong trials."""
MIN_TRIALS = 4
"""Fewer finished trials than this make a rank correlation noise (over 3 it can only be -1, -0.5, 0.5 or 1):
no warning is drawn from them."""
MIN_RANKED = 3
"""Fewer trials than this have no rank correlation at all (it is undefined, as it is when their scores tie)."""


def rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """ASHA's milestones below ``max_t``: grace, grace * rf, grace * rf^2, ..."""
    out, t = [], float(grace_period)
    while t < max_t:
        out.append(int(round(t)))
        t *= reduction_factor
    return sorted(set(out))


def histories(search_path: Path, metric: str) -> dict[str, dict[int, float]]:
    """Each trial's reported ``metric`` per epoch (from Ray Tune's result.json), by trial folder name."""
    out = {}
    for result in sorted(Path(search_path).glob("*/result.json")):
        curve = {}
        for line in result.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the line being written right now
                break
            if isinstance(row.get(metric), int | float) and "epoch" in row:
                curve[int(row["epoch"])] = float(row[metric])
        if curve:
            out[result.parent.name] = curve
    return out


def rank_correlations(search_path: Path, metric: str, rung_epochs: list[int], max_t: int) -> list[dict]:
    """Per rung: ``{"epoch", "spearman", "trials"}`` over the trials that reported ``max_t`` epochs (nan with
    fewer than :data:`MIN_RANKED` such trials, or when every trial scored the same)."""
    return correlations(list(histories(search_path, metric).values()), rung_epochs, max_t)


def correlations(curves: list[dict[int, float]], epochs: list[int], max_t: int) -> list[dict]:
    """:func:`rank_correlations` over trial curves (epoch -> score), e.g. pooled from several searches."""
    from scipy.stats import spearmanr

    done = [c for c in curves if max_t in c]
    out = []
    for epoch in epochs:
        pairs = [(c[epoch], c[max_t]) for c in done if epoch in c]
        rho = math.nan
        if len(pairs) >= MIN_RANKED and len({a for a, _ in pairs}) > 1 and len({b for _, b in pairs}) > 1:
            rho = float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)
        out.append({"epoch": epoch, "spearman": rho, "trials": len(pairs)})
    return out


def grace_from_data(
    curves: list[dict[int, float]], max_t: int, trust: float = TRUST
) -> tuple[int | None, list[dict]]:
    """A grace period the data supports: the first epoch from which the rank correlation of every later epoch's
    score with the final one stays at or above ``trust``, over trials that all ran to ``max_t`` (a FIFO
    search); None with fewer than :data:`MIN_TRIALS` such trials or when not even epoch ``max_t - 1`` gets
    there. Also the correlation at every epoch before ``max_t``."""
    corr = correlations(curves, list(range(1, max_t)), max_t)
    if not corr or corr[-1]["trials"] < MIN_TRIALS:
        return None, corr
    grace = None
    for row in reversed(corr):
        if not row["spearman"] >= trust:  # nan (every trial the same) does not count as agreement
            break
        grace = row["epoch"]
    return grace, corr


def warning(correlations: list[dict], metric: str) -> str | None:
    """One line when the grace period's rank correlation is measured over at least :data:`MIN_TRIALS` finished
    trials and is below :data:`TRUST`."""
    if not correlations or math.isnan(correlations[0]["spearman"]) or correlations[0]["spearman"] >= TRUST:
        return None
    if correlations[0]["trials"] < MIN_TRIALS:
        return None
    c = correlations[0]
    return (
        f"warning: early stopping may stop the wrong trials here: the rank correlation between {metric} at "
        f"epoch {c['epoch']} (the grace period) and at the end is {c['spearman']:.2f} over {c['trials']} "
        f"finished trials (below {TRUST}); raise search.grace_period or use search.scheduler: fifo"
    )
