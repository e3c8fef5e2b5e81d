"""Batched inference that answers every item (Ray Serve `@serve.batch`, Triton's equal-shape rule).

`run_batch` takes one input dict per study (arrays *without* the batch axis), stacks the items
whose inputs have equal shapes, runs each stack once, and splits the outputs back per item. A bad
item (wrong type, non-finite values) gets its own error and never reaches the model; when a stacked
run fails, each item of that stack is retried alone so only the culprit fails.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import InferenceError, RadtriageError

Arrays = Mapping[str, np.ndarray]
RunFn = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class BatchItemResult:
    """One item's outputs (batch axis removed) or its error `{"code", "message"}`."""

    outputs: dict[str, np.ndarray] | None = None
    error: dict[str, str] | None = None
    batch_size: int = 1  # how many items ran in the same model call (0 = never ran)

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> dict[str, np.ndarray]:
        """The outputs, or an `InferenceError` carrying the item's message."""
        if self.outputs is None:
            error = self.error or {"code": "model_failure", "message": "no output"}
            raise InferenceError(f"model inference failed: {error['message']}")
        return self.outputs


def _error(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, RadtriageError):
        return exc.to_dict()
    return {"code": "model_failure", "message": f"{type(exc).__name__}: {exc}"}


def _validate(item: object) -> dict[str, np.ndarray]:
    if not isinstance(item, Mapping) or not item:
        raise InferenceError(f"batch item must be a non-empty mapping of arrays, got {item!r:.80}")
    arrays: dict[str, np.ndarray] = {}
    for name, value in item.items():
        if not isinstance(value, np.ndarray):
            raise InferenceError(
                f"input {name!r} must be a numpy array, got {type(value).__name__}"
            )
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise InferenceError(f"input {name!r} contains NaN or infinite values")
        arrays[str(name)] = value
    return arrays


def _signature(arrays: Mapping[str, np.ndarray]) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    return tuple(sorted((k, v.shape, v.dtype.str) for k, v in arrays.items()))


def _run_stack(run: RunFn, items: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    stacked = {name: np.stack([it[name] for it in items]) for name in items[0]}
    outputs = run(stacked)
    per_item: list[dict[str, np.ndarray]] = [{} for _ in items]
    for name, value in outputs.items():
        value = np.asarray(value)
        if value.shape[:1] != (len(items),):
            raise InferenceError(
                f"output {name!r} has shape {value.shape}, expected batch axis {len(items)}"
            )
        for i in range(len(items)):
            per_item[i][name] = value[i]
    return per_item


def run_batch(run: RunFn, items: Sequence[object]) -> list[BatchItemResult]:
    """Run `items` through `run` in as few calls as shapes allow; one result per item, in order."""
    results: list[BatchItemResult | None] = [None] * len(items)
    groups: dict[tuple[tuple[str, tuple[int, ...], str], ...], list[int]] = {}
    valid: dict[int, dict[str, np.ndarray]] = {}
    for i, item in enumerate(items):
        try:
            valid[i] = _validate(item)
        except RadtriageError as exc:
            results[i] = BatchItemResult(error=_error(exc), batch_size=0)
            continue
        groups.setdefault(_signature(valid[i]), []).append(i)
    for indices in groups.values():
        try:
            outputs = _run_stack(run, [valid[i] for i in indices])
        except Exception as exc:
            if len(indices) == 1:
                results[indices[0]] = BatchItemResult(error=_error(exc), batch_size=1)
                continue
            for i in indices:  # find the culprit: every item alone
                try:
                    results[i] = BatchItemResult(_run_stack(run, [valid[i]])[0], batch_size=1)
                except Exception as item_exc:
                    results[i] = BatchItemResult(error=_error(item_exc), batch_size=1)
            continue
        for i, out in zip(indices, outputs, strict=True):
            results[i] = BatchItemResult(out, batch_size=len(indices))
    return [
        r if r is not None else BatchItemResult(error=_error(RuntimeError("lost"))) for r in results
    ]
