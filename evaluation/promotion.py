"""The promotion gate: a candidate may not replace the promoted model if it is worse on the
PI-CAI ranking score beyond the confidence interval of a paired bootstrap on the same cases.

`radtriage models promote` calls `check_promotion`; forcing past a refusal needs a reason,
which the caller records in the repository's promotion log together with `to_dict()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InputError
from evaluation.compare import compare_records
from evaluation.runner import LabelledCase, Predictor, load_cases, load_pipeline, run_cases


@dataclass(frozen=True)
class PromotionVerdict:
    """Whether `candidate` may be promoted, and why."""

    allowed: bool
    reason: str
    name: str
    candidate_version: str
    current_version: str | None
    forced: bool = False
    force_reason: str | None = None
    comparison: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "reason": self.reason,
            "name": self.name,
            "candidate_version": self.candidate_version,
            "current_version": self.current_version,
            "forced": self.forced,
            "force_reason": self.force_reason,
            "comparison": self.comparison,
        }


def check_promotion(
    repository: Any,
    name: str,
    candidate_version: str,
    data: str | Sequence[LabelledCase],
    *,
    force_reason: str | None = None,
    gland: str = "prostate_gland",
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    predictor_factory: Callable[[str], Predictor] | None = None,
) -> PromotionVerdict:
    """Compare NAME:candidate_version with the promoted NAME on `data` (a `--data` spec or cases).

    Refused when the upper end of the CI of (candidate - current) PI-CAI score is below 0.
    `force_reason` turns a refusal into an allowed, forced verdict; an empty reason is an
    `InputError`. `repository` is a `models.repository.ModelRepository`, a path, or None (the
    bundled one); `predictor_factory(ref)` replaces the server pipeline (tests, other runtimes).
    """
    from models.repository import ModelRepository

    if force_reason is not None and not force_reason.strip():
        raise InputError("forcing a promotion needs a non-empty reason; it is recorded")
    repo = (
        repository
        if isinstance(repository, ModelRepository)
        else ModelRepository(Path(repository) if repository is not None else None)
    )
    candidate_ref = f"{name}:{candidate_version}"
    repo.resolve(candidate_ref)  # raises ModelNotFoundError for an unknown candidate
    current = repo.promoted(name)
    if current is None:
        return PromotionVerdict(
            True, f"{name} has no promoted version yet", name, candidate_version, None
        )
    if current == candidate_version:
        return PromotionVerdict(
            True,
            f"{candidate_ref} is already the promoted version",
            name,
            candidate_version,
            current,
        )
    factory = predictor_factory or (
        lambda ref: load_pipeline(ref, gland=gland, repository=repo.root)
    )
    cases = list(load_cases(data) if isinstance(data, str) else data)
    current_records = run_cases(factory(f"{name}:{current}"), cases)
    candidate_records = run_cases(factory(candidate_ref), cases)
    comparison = compare_records(
        current_records, candidate_records, n_bootstrap=n_bootstrap, seed=seed, level=level
    )
    score = comparison["picai_score"]
    diff = score["difference"]
    low, high = diff["ci"]
    text = (
        f"PI-CAI score current {name}:{current} {score['a']:.3f}, candidate {score['b']:.3f}; "
        f"difference {diff['value']:+.3f} ({level:.0%} CI {low:+.3f} to {high:+.3f}) on "
        f"{len(cases)} cases"
    )
    if high is not None and high < 0:
        if force_reason:
            return PromotionVerdict(
                True,
                f"FORCED despite a worse candidate: {text}",
                name,
                candidate_version,
                current,
                True,
                force_reason,
                comparison,
            )
        return PromotionVerdict(
            False,
            f"refused: candidate is worse beyond the CI ({text}); fix the model, or force "
            "with a recorded reason",
            name,
            candidate_version,
            current,
            comparison=comparison,
        )
    return PromotionVerdict(
        True,
        f"allowed: not worse beyond the CI ({text})",
        name,
        candidate_version,
        current,
        False,
        force_reason,
        comparison,
    )
