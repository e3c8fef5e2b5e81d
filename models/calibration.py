"""Case-likelihood calibration: a monotone map from the detector's raw case score to a probability.

Stored in `metadata.json` as `calibration: {method, x, y, ...}`: knots of a non-decreasing
piecewise-linear map, applied with `numpy.interp` (flat beyond the end knots). Serving needs
only these numbers; fitting (scikit-learn) happens in `radtriage evaluate --write-thresholds`
on a calibration split that training never saw. No `calibration` = identity, so older models
load and score as before.

Methods:
- ``isotonic``: scikit-learn `IsotonicRegression`; the knots are the centres of its constant
  blocks ("centred isotonic regression", Oron & Flournoy 2017), so the map is strictly
  increasing between the first and last block and ranks (AUROC) are kept there.
- ``platt``: logistic regression on logit(score) (Platt scaling), strictly increasing; its
  coefficients are kept in `parameters` and its curve is tabulated on knots for serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.special import expit

_EPS = 1e-6
_PLATT_KNOTS = 201


class CalibrationSpec(BaseModel):
    """A fitted case-likelihood calibrator: knots (x raw score, y calibrated probability)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["isotonic", "platt"]
    x: tuple[float, ...] = Field(description="raw case likelihood at each knot, increasing")
    y: tuple[float, ...] = Field(description="calibrated probability at each knot")
    parameters: dict[str, float] = Field(default_factory=dict, description="platt: a, b")
    n_cases: int = Field(ge=1)
    n_cspca: int = Field(ge=0)
    source: str = Field(description="the data it was fitted on (never seen in training)")

    @model_validator(mode="after")
    def _monotone_knots(self) -> CalibrationSpec:
        x, y = np.asarray(self.x, float), np.asarray(self.y, float)
        if x.size < 1 or x.size != y.size:
            raise ValueError("calibration x and y must be non-empty and of equal length")
        if np.any(np.diff(x) <= 0):
            raise ValueError("calibration x knots must be strictly increasing")
        if np.any(np.diff(y) < 0):
            raise ValueError("calibration y knots must be non-decreasing (a monotone map)")
        if np.any((x < 0) | (x > 1) | (y < 0) | (y > 1)) or not np.isfinite(x + y).all():
            raise ValueError("calibration knots must lie in [0, 1]")
        return self

    def apply(self, raw: float | np.ndarray) -> Any:
        """Calibrated likelihood of `raw` (scalar or array), in [0, 1]."""
        return calibrate(raw, self)


def calibrate(raw: float | np.ndarray, spec: CalibrationSpec | None) -> Any:
    """`spec` applied to `raw`; identity when `spec` is None."""
    if spec is None:
        return raw
    out = np.interp(np.asarray(raw, dtype=float), spec.x, spec.y)
    return float(out) if np.ndim(out) == 0 else out


def _check(scores: Sequence[float], labels: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    if s.ndim != 1 or s.shape != y.shape or s.size < 2:
        raise ValueError("calibration needs >= 2 scores and as many labels")
    if np.any((s < 0) | (s > 1)) or not np.isfinite(s).all():
        raise ValueError("scores must lie in [0, 1]")
    if y.all() or not y.any():
        raise ValueError("calibration needs csPCa-positive and negative cases")
    return s, y


def fit_isotonic(
    scores: Sequence[float], labels: Sequence[bool], *, source: str
) -> CalibrationSpec:
    """Centred isotonic regression of labels on scores (see module doc)."""
    from sklearn.isotonic import IsotonicRegression

    s, y = _check(scores, labels)
    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit_transform(s, y)
    xs, ys = [], []
    for level in np.unique(fitted):
        block = s[fitted == level]
        xs.append(float(block.mean()))
        ys.append(float(level))
    x, idx = np.unique(np.asarray(xs), return_index=True)
    return CalibrationSpec(
        method="isotonic",
        x=tuple(float(v) for v in x),
        y=tuple(float(v) for v in np.asarray(ys)[idx]),
        n_cases=int(s.size),
        n_cspca=int(y.sum()),
        source=source,
    )


def fit_platt(scores: Sequence[float], labels: Sequence[bool], *, source: str) -> CalibrationSpec:
    """Platt scaling: P(csPCa) = sigmoid(a * logit(score) + b), tabulated on knots."""
    from sklearn.linear_model import LogisticRegression

    s, y = _check(scores, labels)
    logit = np.log(np.clip(s, _EPS, 1 - _EPS) / np.clip(1 - s, _EPS, 1 - _EPS))
    lr = LogisticRegression(C=1e4).fit(logit[:, None], y.astype(int))
    a, b = float(lr.coef_[0][0]), float(lr.intercept_[0])
    if a <= 0:
        raise ValueError(
            f"Platt fit is not increasing (slope {a:.3g}): the scores do not rank csPCa here"
        )
    grid = np.unique(np.concatenate([np.linspace(0.0, 1.0, _PLATT_KNOTS), s]))
    g = np.log(np.clip(grid, _EPS, 1 - _EPS) / np.clip(1 - grid, _EPS, 1 - _EPS))
    curve = expit(a * g + b)  # stable for the steep slopes of near-separable scores
    return CalibrationSpec(
        method="platt",
        x=tuple(float(v) for v in grid),
        y=tuple(float(v) for v in np.maximum.accumulate(curve)),
        parameters={"a": a, "b": b},
        n_cases=int(s.size),
        n_cspca=int(y.sum()),
        source=source,
    )


def fit_calibration(
    scores: Sequence[float],
    labels: Sequence[bool],
    *,
    method: Literal["isotonic", "platt"] = "isotonic",
    source: str,
) -> CalibrationSpec:
    """Fit `method` on (raw score, csPCa label) pairs of a calibration split."""
    if method == "isotonic":
        return fit_isotonic(scores, labels, source=source)
    if method == "platt":
        return fit_platt(scores, labels, source=source)
    raise ValueError(f"unknown calibration method {method!r}: isotonic or platt")
