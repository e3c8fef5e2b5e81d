"""Shadow comparison: the candidate's stored shadow results against the live model on the same
studies, and, where outcomes have arrived, a paired bootstrap of their AUROC against biopsy.

`radtriage models shadow-report --shadow DIR [--outcomes MARKSHEET]` prints it; the promotion
gate (`evaluation.promotion.gate`) uses `compare_shadow` as its live evidence.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from core.errors import InputError
from evaluation.bootstrap import paired_bootstrap
from evaluation.metrics import _auroc, json_safe
from evaluation.outcomes import Outcome
from models.shadow_log import ShadowRecord


def compare_shadow(
    records: Iterable[ShadowRecord],
    outcomes: Sequence[Outcome] = (),
    *,
    candidate: str | None = None,
    soon: float = 0.2,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Primary vs shadow on every stored study (optionally only shadow model `candidate`,
    NAME:VERSION); outcomes join by StudyInstanceUID (the marksheet's `study_instance_uid`)."""
    rows = [r for r in records if candidate is None or r.shadow_model == candidate]
    ok = [r for r in rows if r.shadow_likelihood is not None]
    if not rows:
        raise InputError(
            f"no stored shadow results{f' for {candidate}' if candidate else ''}: run the "
            "candidate as [models] shadow in the server first"
        )
    primary = np.array([r.primary_likelihood for r in ok])
    shadow = np.array([r.shadow_likelihood for r in ok], dtype=float)
    delta = np.abs(primary - shadow)
    doc: dict[str, Any] = {
        "kind": "shadow_comparison",
        "primary_models": sorted({r.primary_model for r in rows}),
        "shadow_models": sorted({r.shadow_model or "error" for r in rows}),
        "n_studies": len(rows),
        "n_shadow_errors": len(rows) - len(ok),
        "first": min(r.at for r in rows),
        "last": max(r.at for r in rows),
        "mean_abs_delta": float(delta.mean()) if ok else math.nan,
        "p95_abs_delta": float(np.percentile(delta, 95)) if ok else math.nan,
        "flag_agreement": float(np.mean((primary >= soon) == (shadow >= soon))) if ok else math.nan,
        "flag_rule": f"likelihood >= soon ({soon:g})",
    }
    truth = {o.study_instance_uid: o.is_cspca for o in outcomes if o.study_instance_uid}
    paired = [
        (r, truth[r.study_instance_uid]) for r in ok if truth.get(r.study_instance_uid) is not None
    ]
    doc["n_with_outcome"] = len(paired)
    if paired:
        y = np.array([bool(t) for _, t in paired], dtype=int)
        a = np.array([r.primary_likelihood for r, _ in paired])
        b = np.array([r.shadow_likelihood for r, _ in paired], dtype=float)
        diff = paired_bootstrap(
            len(paired),
            lambda i: _auroc(y[i], a[i]),
            lambda i: _auroc(y[i], b[i]),
            n_bootstrap=n_bootstrap,
            seed=seed,
            level=level,
        )
        doc["n_cspca"] = int(y.sum())
        doc["auroc"] = diff.to_dict()  # a = primary, b = shadow
    else:
        doc["n_cspca"] = 0
        doc["auroc"] = None
    return json_safe(doc)


def _f(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def shadow_text(doc: dict[str, Any]) -> str:
    lines = [
        f"shadow {', '.join(doc['shadow_models'])} vs live {', '.join(doc['primary_models'])}: "
        f"{doc['n_studies']} studies ({doc['first']} to {doc['last']}), "
        f"{doc['n_shadow_errors']} shadow errors",
        f"mean |delta likelihood| {_f(doc['mean_abs_delta'])} (p95 {_f(doc['p95_abs_delta'])}); "
        f"flag agreement {_f(doc['flag_agreement'], '.1%')} ({doc['flag_rule']})",
    ]
    if doc.get("auroc"):
        d = doc["auroc"]
        lo, hi = d["difference"]["ci"]
        lines.append(
            f"AUROC vs biopsy on {doc['n_with_outcome']} studies ({doc['n_cspca']} csPCa): "
            f"live {_f(d['a'])}, shadow {_f(d['b'])}, difference "
            f"{_f(d['difference']['value'], '+.3f')} (CI {_f(lo, '+.3f')} to {_f(hi, '+.3f')})"
        )
    else:
        lines.append("no outcomes joined yet (marksheet study_instance_uid)")
    return "\n".join(lines)
