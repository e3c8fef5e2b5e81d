"""Monitoring report: what the deployed models said, period by period, and whether to worry.

From the server's stored results (`<storage root>/results/<uid>/result.json`) and, when given,
the outcome marksheet (`evaluation.outcomes`): per model version and period (day/week/month)
the distribution of case likelihoods (quantiles, histogram) and priorities, the share of
`not_analysed` by reason code, and agreement with the radiologists' PI-RADS and biopsy outcomes
as they arrive. Alerts compare each period with `MonitoringSettings` thresholds, read from the
config's `[monitoring]` table. `radtriage models monitor` prints it (exit 3 on alerts).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError
from core.priority import Thresholds
from core.settings import MonitoringSettings, load_settings
from evaluation.metrics import json_safe
from evaluation.outcomes import Outcome, performance

RESULT_FILE = "result.json"
HISTOGRAM_EDGES = tuple(i / 10 for i in range(11))


def load_monitoring_settings(path: Path | None) -> MonitoringSettings:
    """The `[monitoring]` section of the settings at `path` (defaults when absent)."""
    return load_settings(path).monitoring


@dataclass(frozen=True)
class StoredResult:
    study_instance_uid: str
    at: datetime
    model: str  # NAME:VERSION, "none" when no model ran
    priority: str
    likelihood: float | None
    reason_code: str | None


def read_results(root: Path) -> list[StoredResult]:
    """Every `*/result.json` under `root` (time: `analysed_at` if stated, else file mtime)."""
    if not root.is_dir():
        raise InputError(f"--results {root}: no such folder (the server's <storage>/results)")
    out = []
    for path in sorted(root.glob(f"*/{RESULT_FILE}")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            model = doc.get("model") or {}
            stamp = doc.get("analysed_at")
            at = (
                datetime.fromisoformat(stamp)
                if isinstance(stamp, str)
                else datetime.fromtimestamp(path.stat().st_mtime, UTC)
            )
            if at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
            likelihood = doc.get("case_likelihood")
            out.append(
                StoredResult(
                    study_instance_uid=str(doc["study_instance_uid"]),
                    at=at,
                    model=f"{model['name']}:{model['version']}" if model else "none",
                    priority=str(doc["priority"]),
                    likelihood=float(likelihood) if likelihood is not None else None,
                    reason_code=str((doc.get("reason") or {}).get("code") or "") or None,
                )
            )
        except (ValueError, KeyError, TypeError, OSError):
            continue  # a torn or foreign file is not a result; monitoring never stops on one
    return out


def _period(at: datetime, period: str) -> str:
    if period == "day":
        return at.strftime("%Y-%m-%d")
    if period == "month":
        return at.strftime("%Y-%m")
    year, week, _ = at.isocalendar()
    return f"{year}-W{week:02d}"


def _distribution(rows: Sequence[StoredResult]) -> dict[str, Any]:
    lik = np.array([r.likelihood for r in rows if r.likelihood is not None], dtype=float)
    priorities: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in rows:
        priorities[r.priority] = priorities.get(r.priority, 0) + 1
        if r.priority == "not_analysed":
            code = r.reason_code or "unknown"
            reasons[code] = reasons.get(code, 0) + 1
    n = len(rows)
    return {
        "n_studies": n,
        "likelihood": {
            "n": int(lik.size),
            "mean": float(lik.mean()) if lik.size else math.nan,
            "quantiles": {
                q: float(np.quantile(lik, v)) if lik.size else math.nan
                for q, v in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))
            },
            "histogram": {
                "edges": list(HISTOGRAM_EDGES),
                "counts": np.histogram(lik, bins=HISTOGRAM_EDGES)[0].tolist(),
            },
        },
        "priorities": priorities,
        "priority_share": {k: v / n for k, v in priorities.items()},
        "not_analysed_share": priorities.get("not_analysed", 0) / n,
        "not_analysed_by_reason": {k: v / n for k, v in sorted(reasons.items())},
    }


def monitoring_report(
    results: Path | Iterable[StoredResult],
    outcomes: Sequence[Outcome] = (),
    settings: MonitoringSettings | None = None,
    *,
    period: str = "week",
    thresholds: Thresholds | None = None,
) -> dict[str, Any]:
    """Distributions per model version and period, agreement with outcomes, and alerts."""
    settings = settings or MonitoringSettings()
    rows = read_results(results) if isinstance(results, Path) else list(results)
    if period not in ("day", "week", "month"):
        raise InputError(f"period must be day, week or month, not {period!r}")
    cuts = thresholds or Thresholds(urgent=0.5, soon=0.2)
    by_uid = {o.study_instance_uid: o for o in outcomes if o.study_instance_uid}
    versions: dict[str, Any] = {}
    alerts: list[dict[str, Any]] = []
    grouped: dict[str, dict[str, list[StoredResult]]] = {}
    for r in sorted(rows, key=lambda r: r.at):
        grouped.setdefault(r.model, {}).setdefault(_period(r.at, period), []).append(r)
    for model, periods in sorted(grouped.items()):
        entry: dict[str, Any] = {}
        baseline: float | None = None
        for name, members in periods.items():
            dist = _distribution(members)
            matched = [
                _rescored(by_uid[m.study_instance_uid], m)
                for m in members
                if m.study_instance_uid in by_uid and m.likelihood is not None
            ]
            if matched:
                perf = performance(matched, cuts, n_bootstrap=0)
                dist["outcomes"] = {
                    "n": len(matched),
                    "n_with_outcome": perf["n_with_outcome"],
                    "pirads_agreement": perf["pirads_agreement"]["agreement"],
                    "biopsy_sensitivity_at_soon": perf["at_soon"]["sensitivity"],
                }
            median = dist["likelihood"]["quantiles"]["p50"]
            if baseline is None and not math.isnan(median):
                baseline = median
            dist["likelihood_shift"] = (
                median - baseline if baseline is not None and not math.isnan(median) else math.nan
            )
            alerts += _alerts(model, name, dist, settings)
            entry[name] = dist
        versions[model] = entry
    return json_safe(
        {
            "kind": "monitoring",
            "period": period,
            "n_studies": len(rows),
            "thresholds": {"soon": cuts.soon, "urgent": cuts.urgent},
            "settings": settings.model_dump(),
            "by_model_version": versions,
            "alerts": alerts,
        }
    )


def _rescored(outcome: Outcome, result: StoredResult) -> Outcome:
    """The outcome with the score this result stored (the marksheet may hold another)."""
    from dataclasses import replace

    return replace(outcome, ai_score=float(result.likelihood or 0.0))


def _alerts(
    model: str, period: str, dist: dict[str, Any], s: MonitoringSettings
) -> list[dict[str, Any]]:
    if dist["n_studies"] < s.min_studies:
        return []
    found = []

    def alert(metric: str, value: float, limit: float, text: str) -> None:
        found.append(
            {
                "model": model,
                "period": period,
                "metric": metric,
                "value": value,
                "limit": limit,
                "message": text,
            }
        )

    share = dist["not_analysed_share"]
    if share > s.not_analysed_share_max:
        alert(
            "not_analysed_share",
            share,
            s.not_analysed_share_max,
            f"{share:.0%} of studies not analysed ({dist['not_analysed_by_reason']})",
        )
    urgent = dist["priority_share"].get("urgent", 0.0)
    if urgent > s.urgent_share_max:
        alert("urgent_share", urgent, s.urgent_share_max, f"{urgent:.0%} of studies urgent")
    shift = dist["likelihood_shift"]
    if not math.isnan(shift) and abs(shift) > s.likelihood_shift_max:
        alert(
            "likelihood_shift",
            shift,
            s.likelihood_shift_max,
            f"median likelihood moved {shift:+.3f} from the version's first period",
        )
    out = dist.get("outcomes") or {}
    agreement = out.get("pirads_agreement")
    if agreement is not None and not math.isnan(agreement) and agreement < s.pirads_agreement_min:
        alert(
            "pirads_agreement",
            agreement,
            s.pirads_agreement_min,
            f"AI agrees with PI-RADS>=3 on {agreement:.0%} of rated studies",
        )
    sens = out.get("biopsy_sensitivity_at_soon")
    if sens is not None and not math.isnan(sens) and sens < s.biopsy_sensitivity_min:
        alert(
            "biopsy_sensitivity",
            sens,
            s.biopsy_sensitivity_min,
            f"sensitivity at soon vs biopsy {sens:.0%}",
        )
    return found


def monitoring_text(doc: dict[str, Any]) -> str:
    lines = [f"monitoring ({doc['period']}): {doc['n_studies']} studies"]
    for model, periods in doc["by_model_version"].items():
        lines.append(model)
        for name, d in periods.items():
            q = d["likelihood"]["quantiles"]
            p50 = "n/a" if q["p50"] is None else f"{q['p50']:.3f}"
            shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(d["priority_share"].items()))
            lines.append(f"  {name}: {d['n_studies']} studies, median likelihood {p50}; {shares}")
    for a in doc["alerts"]:
        lines.append(f"ALERT {a['model']} {a['period']} {a['metric']}: {a['message']}")
    if not doc["alerts"]:
        lines.append("no alerts")
    return "\n".join(lines)
