"""`radtriage evaluate`: PI-CAI metrics, priority thresholds, HTML report, model comparison."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from core.errors import InputError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a model on labelled cases (PI-CAI metrics, thresholds, report)",
        description="Run the server's inference pipeline on labelled cases and report case-level "
        "AUROC/AP, the PI-CAI ranking score, lesion FROC, sensitivity/specificity at the priority "
        "thresholds, calibration, gland Dice and subgroups, with seeded bootstrap 95%% CIs.",
    )
    p.add_argument(
        "--data",
        required=True,
        help="phantoms:N[:SEED[:FAMILY]] (default SEED 100000, FAMILY standard|randomised), a "
        "labelled dataset folder, or an outcome marksheet (CSV with ai_score: `feedback "
        "export`) for live performance per model version, site and vendor",
    )
    p.add_argument(
        "--model",
        "--detector",
        dest="model",
        default="cspca_detector",
        help="detector NAME[:VERSION] (--detector, as in `infer`)",
    )
    p.add_argument("--gland", default="prostate_gland", help="gland model NAME[:VERSION]")
    p.add_argument("--repository", type=Path, help="model repository (default: bundled)")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="compare two detector versions (NAME:VERSION) on the same cases",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--report", type=Path, metavar="OUT.html", help="write the HTML report")
    p.add_argument(
        "--write-thresholds",
        action="store_true",
        help="write the thresholds, calibration and gate fitted on these cases as a NEW "
        "version of the model (NAME:VERSION-tN; versions are immutable); promote it with "
        "`radtriage models promote`",
    )
    p.add_argument(
        "--new-version",
        metavar="VERSION",
        help="with --write-thresholds: the new version's name (default: VERSION-tN)",
    )
    p.add_argument("--target-sensitivity", type=float, default=0.95)
    p.add_argument(
        "--confidence", type=float, default=0.95, help="confidence of the sensitivity lower bound"
    )
    p.add_argument("--urgent-specificity", type=float, default=0.90)
    p.add_argument(
        "--calibration",
        choices=("platt", "isotonic", "none"),
        default="platt",
        help="with --write-thresholds: case-likelihood calibrator fitted on the calibration split",
    )
    p.add_argument(
        "--check-fraction",
        type=float,
        default=0.4,
        help="with --write-thresholds: share of cases held out to measure the bands",
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of the calibration/check split")
    p.add_argument(
        "--gate-alpha",
        type=float,
        default=0.02,
        help="target in-distribution low-confidence rate of the out-of-distribution gate",
    )
    p.add_argument(
        "--no-ood-gate", action="store_true", help="with --write-thresholds: write no ood_gate"
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from evaluation.runner import load_cases, load_pipeline, run_cases

    if args.bootstrap < 10:
        raise InputError("--bootstrap must be at least 10")
    if _is_marksheet(args.data):
        return _live(args)
    cases = list(load_cases(args.data))
    if not cases:
        raise InputError(f"--data {args.data} held no cases")

    def records_for(ref: str) -> list[Any]:
        from evaluation.validation_fit import GatedRecorder

        recorder = GatedRecorder(load_pipeline(ref, args.gland, args.repository))
        return recorder.attach(run_cases(recorder, cases))

    doc = _compare(args, records_for) if args.compare else _evaluate(args, records_for(args.model))
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(_text(doc))
    return 0


def _is_marksheet(data: str) -> bool:
    from evaluation.outcomes import is_outcome_marksheet

    return not data.startswith("phantoms:") and is_outcome_marksheet(Path(data))


def _live(args: argparse.Namespace) -> int:
    """Live performance from an outcome marksheet: no images, the scores the models reported."""
    from core.errors import ModelError
    from core.priority import Thresholds
    from evaluation.outcomes import live_performance, read_outcomes

    if args.compare or args.write_thresholds or args.report:
        raise InputError(
            "--compare, --write-thresholds and --report need images (--data DIR|phantoms:N); "
            "an outcome marksheet holds the scores the models reported (compare versions live "
            "with `radtriage models shadow-report`)"
        )
    repo = _repository(args)
    provisional = Thresholds(urgent=0.5, soon=0.2)
    sources: dict[str, str] = {}

    def thresholds_for(ref: str) -> Thresholds:
        try:
            md = repo.resolve(ref).metadata if ":" in ref else None
        except (ModelError, InputError):
            md = None
        if md is not None and md.thresholds is not None:
            sources[ref] = md.thresholds.source
            return md.thresholds.as_thresholds()
        sources[ref] = "provisional (model not in this repository or without thresholds)"
        return provisional

    doc = live_performance(
        read_outcomes(Path(args.data)), thresholds_for, n_bootstrap=args.bootstrap, seed=args.seed
    )
    doc["data"] = args.data
    doc["thresholds_source"] = sources
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(doc, indent=2) if args.json else _live_text(doc))
    return 0


def _live_text(doc: dict[str, Any]) -> str:
    lines = [f"live performance on {doc['data']}: {doc['n_studies']} studies"]
    for ref, v in doc["by_model_version"].items():
        lines.append(
            f"{ref}: {v['n_studies']} studies, {v['n_with_outcome']} with outcome "
            f"({v['n_cspca']} csPCa, {v['n_pending']} pending); AUROC {_fmt(v['auroc'])} "
            f"({_fmt(v['auroc_ci'][0])}-{_fmt(v['auroc_ci'][1])}); sensitivity at soon "
            f"{_fmt(v['at_soon']['sensitivity'])}; PI-RADS kappa "
            f"{_fmt(v['pirads_agreement']['kappa'])}"
        )
        for key in ("by_site", "by_vendor"):
            for group, g in v[key].items():
                lines.append(
                    f"  {key[3:]} {group}: {g['n_with_outcome']} with outcome, AUROC "
                    f"{_fmt(g['auroc'])}, sensitivity at soon {_fmt(g['at_soon']['sensitivity'])}"
                )
    return "\n".join(lines)


def _repository(args: argparse.Namespace) -> Any:
    from models.repository import ModelRepository

    return ModelRepository(args.repository)


def _evaluate(args: argparse.Namespace, records: list[Any]) -> dict[str, Any]:
    from evaluation.metrics import evaluate_records, json_safe
    from evaluation.operating_points import band_metrics, choose_thresholds, record_strata
    from evaluation.report import render_html
    from evaluation.validation_fit import (
        calibration_before_after,
        fit_on_splits,
        gate_rates,
        model_card_section,
        with_calibrated,
        write_card_section,
    )
    from models.metadata import METADATA_FILE, ThresholdSpec

    version = _repository(args).resolve(args.model)
    md = version.metadata
    choice = choose_thresholds(
        [r.likelihood for r in records],
        [r.is_cspca for r in records],
        target_sensitivity=args.target_sensitivity,
        confidence=args.confidence,
        urgent_specificity=args.urgent_specificity,
    )
    written = None
    new_version: str | None = None
    fitted: dict[str, Any] | None = None
    if args.write_thresholds:
        fit = fit_on_splits(
            records,
            data=args.data,
            method=args.calibration,
            check_fraction=args.check_fraction,
            split_seed=args.split_seed,
            target_sensitivity=args.target_sensitivity,
            confidence=args.confidence,
            urgent_specificity=args.urgent_specificity,
            gate_alpha=args.gate_alpha,
        )
        choice = fit.choice
        if not choice.meets_target:
            raise InputError(
                f"refusing to write thresholds: {choice.n_cspca} csPCa cases in the calibration "
                f"split cannot show sensitivity >= {choice.target_sensitivity} with "
                f"{choice.confidence:.0%} confidence (needs >= {choice.min_cspca_needed}); "
                "evaluate on more cases"
            )
        source = (
            f"radtriage evaluate --data {args.data} --write-thresholds: calibration split "
            f"n={choice.n_cases} ({choice.n_cspca} csPCa, split seed {args.split_seed}, "
            f"calibration {args.calibration}): {choice.rule}; bands measured on the held-out "
            f"check split n={fit.check_bands['n_cases']}"
        )
        spec = ThresholdSpec(
            urgent=choice.thresholds.urgent,
            soon=choice.thresholds.soon,
            source=source,
            scale="calibrated" if fit.calibration is not None else "raw",
            bands=fit.check_bands,
        )
        # a version is immutable: the fit becomes a new version derived from this one
        update = {
            "thresholds": spec,
            "calibration": fit.calibration,
            "ood_gate": None if args.no_ood_gate else fit.gate,
        }
        derived = _repository(args).derive(
            f"{md.name}:{md.version}", update, new_version=args.new_version
        )
        md = derived.metadata
        write_card_section(
            derived.path / md.model_card,
            model_card_section(fit, source=source),
            fit.choice.thresholds,
        )
        written = str(derived.path / METADATA_FILE)
        new_version = f"{md.name}:{md.version}"
        fitted = fit.summary
        records = with_calibrated([records[i] for i in fit.check_index], fit.calibration)
    if md.thresholds is not None:
        thresholds, source = md.thresholds.as_thresholds(), md.thresholds.source
    else:
        thresholds, source = choice.thresholds, "chosen on these cases (model has none)"
    ev = evaluate_records(records, thresholds, n_bootstrap=args.bootstrap, seed=args.seed)
    summary = dict(ev.summary)
    summary["operating_points"] = json_safe(choice.to_dict())
    summary["thresholds_source"] = source
    summary["thresholds_written_to"] = written
    summary["new_version"] = new_version
    summary["evaluated_on"] = "held-out check split" if fitted is not None else "all cases"
    summary["validation_fit"] = fitted
    summary["calibration_before_after"] = calibration_before_after(records, md.calibration)
    summary["bands"] = json_safe(
        band_metrics(
            [r.likelihood for r in records],
            [r.is_cspca for r in records],
            thresholds,
            level=args.confidence,
            strata=record_strata(records),
        )
    )
    summary["ood_gate"] = gate_rates(r.extra.get("gate") for r in records)
    summary["model"] = {
        "name": md.name,
        "version": md.version,
        "sha256": md.sha256,
        "digest": md.digest,
        "derived_from": md.derived_from,
        "clinical_use": md.clinical_use,
    }
    summary["data"] = args.data
    if args.report:
        ev = type(ev)(ev.records, ev.metrics, summary)
        context = {
            "model": f"{md.name}:{md.version}",
            "data": args.data,
            "thresholds": source,
            "disclaimer": md.disclaimer or "",
        }
        args.report.write_text(render_html(ev, context=context), encoding="utf-8")
        summary["report"] = str(args.report)
    return summary


def _compare(args: argparse.Namespace, records_for: Any) -> dict[str, Any]:
    from evaluation.compare import compare_records
    from evaluation.metrics import evaluate_records, json_safe
    from evaluation.report import render_comparison_html

    a_ref, b_ref = args.compare
    repo = _repository(args)
    for ref in (a_ref, b_ref):
        repo.resolve(ref)
    ra, rb = records_for(a_ref), records_for(b_ref)
    ea = evaluate_records(ra, n_bootstrap=args.bootstrap, seed=args.seed)
    eb = evaluate_records(rb, n_bootstrap=args.bootstrap, seed=args.seed)
    comparison = json_safe(compare_records(ra, rb, n_bootstrap=args.bootstrap, seed=args.seed))
    keys = (
        "n_cases",
        "n_cspca",
        "auroc",
        "auroc_ci",
        "ap",
        "ap_ci",
        "picai_score",
        "picai_score_ci",
        "calibration",
    )
    doc = {
        "a": {"model": a_ref, **{k: ea.summary[k] for k in keys}},
        "b": {"model": b_ref, **{k: eb.summary[k] for k in keys}},
        "difference_b_minus_a": comparison,
        "data": args.data,
    }
    if args.report:
        args.report.write_text(
            render_comparison_html(ea, eb, comparison, labels=(a_ref, b_ref)), encoding="utf-8"
        )
        doc["report"] = str(args.report)
    return doc


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _text(doc: dict[str, Any]) -> str:
    if "difference_b_minus_a" in doc:
        d = doc["difference_b_minus_a"]["picai_score"]
        lo, hi = d["difference"]["ci"]
        return (
            f"A {doc['a']['model']}: PI-CAI score {_fmt(doc['a']['picai_score'])}\n"
            f"B {doc['b']['model']}: PI-CAI score {_fmt(doc['b']['picai_score'])}\n"
            f"B - A: {_fmt(d['difference']['value'])} (95% CI {_fmt(lo)} to {_fmt(hi)}), "
            f"p = {_fmt(d['p_value'])}"
        )
    lines = [
        f"{doc['model']['name']}:{doc['model']['version']} on {doc['data']}: "
        f"{doc['n_cases']} cases, {doc['n_cspca']} csPCa",
        f"AUROC {_fmt(doc['auroc'])} ({_fmt(doc['auroc_ci'][0])}-{_fmt(doc['auroc_ci'][1])})",
        f"AP ({doc['ap_level']}) {_fmt(doc['ap'])}  PI-CAI score {_fmt(doc['picai_score'])}",
        f"ECE {_fmt(doc['calibration']['ece'])}",
    ]
    for name, p in (doc.get("thresholds") or {}).items():
        lines.append(
            f"{name} >= {p['threshold']:.3f}: sensitivity {_fmt(p['sensitivity'])} "
            f"({_fmt(p['sensitivity_ci'][0])}-{_fmt(p['sensitivity_ci'][1])}), specificity "
            f"{_fmt(p['specificity'])}"
        )
    b = doc.get("bands") or {}
    if b:
        lines.append(
            f"bands ({doc.get('evaluated_on')}): urgent PPV {_fmt(b['urgent']['ppv']['value'])}, "
            f"soon PPV {_fmt(b['soon']['ppv']['value'])}, routine NPV "
            f"{_fmt(b['routine']['npv']['value'])}; distinct: {b['distinct']}"
        )
    cba = doc.get("calibration_before_after") or {}
    if cba.get("method"):
        lines.append(
            f"calibration {cba['method']}: ECE {_fmt(cba['raw']['ece'])} raw -> "
            f"{_fmt(cba['calibrated']['ece'])} calibrated"
        )
    gate = doc.get("ood_gate") or {}
    if gate.get("n"):
        lines.append(
            f"out-of-distribution gate: low confidence {_fmt(gate['low_confidence'])}, outside "
            f"{_fmt(gate['outside'])} of {gate['n']}"
        )
    op = doc["operating_points"]
    lines.append(
        f"chosen here: soon {op['soon']:.3f}, urgent {op['urgent']:.3f} "
        f"(target met: {op['meets_target']})"
    )
    if doc.get("thresholds_written_to"):
        lines.append(
            f"new version {doc['new_version']} written ({doc['thresholds_written_to']}); "
            f"it serves once promoted: radtriage models promote {doc['new_version']}"
        )
    if doc.get("report"):
        lines.append(f"report: {doc['report']}")
    return "\n".join(lines)
