"""The promotion gate, one for every path (CLI `models promote|rollback`, training, the server's
rollout, which only serves what `ModelRepository.promoted` vouches for).

A candidate may not replace the promoted model if it is worse beyond the confidence interval of
a paired bootstrap on the same cases, on either kind of evidence:

- offline: `data` (labelled cases, `--data`), both versions re-run, PI-CAI ranking score
  (`check_promotion`);
- live: the candidate's stored shadow results against the live model on the same studies,
  AUROC against the biopsy outcomes that have arrived (`evaluation.shadow_report`).

No evidence, or too little (fewer than `MIN_LIVE_PER_CLASS` csPCa or benign outcomes), is a
refusal too. Forcing past a
refusal needs a non-empty reason; `gate` returns a `models.repository.GateDecision` that
`ModelRepository.promote` records in the append-only promotion log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InputError
from evaluation.compare import compare_records
from evaluation.outcomes import Outcome
from evaluation.runner import LabelledCase, Predictor, load_cases, load_pipeline, run_cases
from evaluation.shadow_report import compare_shadow
from models.repository import GateDecision, ModelRepository
from models.shadow_log import ShadowRecord

# Live evidence below this many csPCa or benign outcomes cannot show a candidate is worse (the
# paired AUROC interval spans everything), so the gate refuses rather than passes on it.
MIN_LIVE_PER_CLASS = 10


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
    """Compare NAME:candidate_version with the promoted NAME on `data` (a `--data` spec or cases);
    the offline evidence of `gate`.

    Refused when the upper end of the CI of (candidate - current) PI-CAI score is below 0.
    `force_reason` turns a refusal into an allowed, forced verdict; an empty reason is an
    `InputError`. `repository` is a `models.repository.ModelRepository`, a path, or None (the
    bundled one); `predictor_factory(ref)` replaces the server pipeline (tests, other runtimes).
    """
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
    factory = predictor_factory or (lambda ref: _paired_pipeline(repo, ref, gland))
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


def _paired_pipeline(repo: ModelRepository, ref: str, gland: str) -> Predictor:
    """The pipeline for a detector or gland version `ref`, paired with the other model's
    version on its grid (`ModelRepository.partner`), so a grid change can pass the gate."""
    if repo.resolve(ref).metadata.task == "gland_segmentation":
        return load_pipeline(repo.partner(ref, "cspca_detector"), gland=ref, repository=repo.root)
    if ":" not in gland:
        gland = repo.partner(ref, gland)
    return load_pipeline(ref, gland=gland, repository=repo.root)


def _repo(repository: Any) -> ModelRepository:
    if isinstance(repository, ModelRepository):
        return repository
    return ModelRepository(Path(repository) if repository is not None else None)


def _live_verdict(
    name: str,
    candidate: str,
    current: str,
    shadow: Iterable[ShadowRecord],
    outcomes: Sequence[Outcome],
    *,
    n_bootstrap: int,
    seed: int,
    level: float,
) -> tuple[bool, str, dict[str, Any]]:
    """(not worse?, why, evidence) from stored shadow results joined with outcomes."""
    doc = compare_shadow(
        shadow,
        outcomes,
        candidate=f"{name}:{candidate}",
        n_bootstrap=n_bootstrap,
        seed=seed,
        level=level,
    )
    live = [m for m in doc["primary_models"] if m != f"{name}:{current}"]
    if live:
        return False, f"shadow results were recorded against {live}, not {name}:{current}", doc
    auroc = doc.get("auroc")
    n, pos = doc["n_with_outcome"], doc["n_cspca"]
    if not auroc or min(pos, n - pos) < MIN_LIVE_PER_CLASS or auroc["difference"]["ci"][1] is None:
        return (
            False,
            f"too little live evidence: {n} shadowed studies with an outcome ({pos} csPCa); "
            f"the gate needs >= {MIN_LIVE_PER_CLASS} csPCa and >= {MIN_LIVE_PER_CLASS} benign "
            "outcomes: wait for more biopsy results",
            doc,
        )
    diff = auroc["difference"]
    low, high = diff["ci"]
    text = (
        f"live AUROC {name}:{current} {auroc['a']:.3f}, shadow {name}:{candidate} "
        f"{auroc['b']:.3f}; difference {diff['value']:+.3f} ({level:.0%} CI {low:+.3f} to "
        f"{high:+.3f}) on {n} studies with outcomes"
    )
    return high >= 0, text, doc


def gate(
    repository: Any,
    name: str,
    candidate_version: str,
    *,
    data: str | Sequence[LabelledCase] | None = None,
    shadow: Iterable[ShadowRecord] | None = None,
    outcomes: Sequence[Outcome] = (),
    force_reason: str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    gland: str = "prostate_gland",
    predictor_factory: Callable[[str], Predictor] | None = None,
) -> GateDecision:
    """The one promotion gate: the decision for NAME:candidate_version against the promoted one.

    Evidence: offline `data` and/or live `shadow` results with `outcomes`; every kind given
    must pass. None given, or a refusal, gives `refused` unless `force_reason` (non-empty)
    turns it into `forced`. Pass the result to `ModelRepository.promote`.
    """
    if force_reason is not None and not force_reason.strip():
        raise InputError("forcing a promotion needs a non-empty reason; it is recorded")
    repo = _repo(repository)
    repo.resolve(f"{name}:{candidate_version}")
    current = repo.promoted(name)
    if current is None or current == candidate_version:
        return GateDecision.first(name, candidate_version, current)
    evidence: dict[str, Any] = {}
    failures: list[str] = []
    passes: list[str] = []
    if data is not None:
        verdict = check_promotion(
            repo,
            name,
            candidate_version,
            data,
            gland=gland,
            n_bootstrap=n_bootstrap,
            seed=seed,
            level=level,
            predictor_factory=predictor_factory,
        )
        evidence["offline"] = verdict.to_dict()
        (passes if verdict.allowed else failures).append(verdict.reason)
    if shadow is not None:
        ok, why, doc = _live_verdict(
            name,
            candidate_version,
            current,
            shadow,
            outcomes,
            n_bootstrap=n_bootstrap,
            seed=seed,
            level=level,
        )
        evidence["live"] = doc
        (passes if ok else failures).append(why)
    if not evidence:
        failures.append(
            f"no evidence: {name}:{current} is promoted; give labelled --data or shadow "
            "results with --outcomes"
        )
    if not failures:
        return GateDecision(
            "passed", name, candidate_version, current, "; ".join(passes), evidence=evidence
        )
    why = "; ".join(failures)
    if force_reason:
        return GateDecision(
            "forced",
            name,
            candidate_version,
            current,
            f"FORCED past a refusal: {why}",
            force_reason=force_reason,
            evidence=evidence,
        )
    return GateDecision(
        "refused",
        name,
        candidate_version,
        current,
        f"refused: {why}; fix the model, gather evidence, or force with a recorded reason",
        evidence=evidence,
    )


def rollback_decision(repository: Any, name: str, version: str, reason: str) -> GateDecision:
    """Back to a version that was once promoted on an allowing decision; needs a reason."""
    if not reason.strip():
        raise InputError("a rollback needs a non-empty reason; it is recorded")
    repo = _repo(repository)
    targets = repo.rollback_targets(name)
    current = repo.promoted(name)
    if version == current:
        return GateDecision.first(name, version, current)
    if version not in targets:
        raise InputError(
            f"{name}:{version} was never promoted through the gate; roll back to one of "
            f"{[t for t in targets if t != current] or 'none'}, or promote it"
        )
    return GateDecision(
        "rollback",
        name,
        version,
        current,
        f"rollback from {name}:{current} to {name}:{version} (promoted before)",
        force_reason=reason,
    )


def promote(
    repository: Any,
    name: str,
    candidate_version: str,
    *,
    reason: str = "",
    user: str | None = None,
    **gate_kwargs: Any,
) -> tuple[GateDecision, dict[str, Any] | None]:
    """Run `gate` and promote when it allows; (decision, log entry or None when refused)."""
    repo = _repo(repository)
    decision = gate(repo, name, candidate_version, **gate_kwargs)
    if not decision.allowed:
        return decision, None
    return decision, repo.promote(
        f"{name}:{candidate_version}", decision, reason=reason or decision.reason, user=user
    )
