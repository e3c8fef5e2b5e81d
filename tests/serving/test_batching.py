from __future__ import annotations

import numpy as np

from serving.batching import run_batch


def _double(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    calls.append(inputs["x"].shape[0])
    if (inputs["x"] < 0).any():
        raise RuntimeError("negative input crashes the model")
    return {"y": inputs["x"] * 2}


calls: list[int] = []


def test_equal_shapes_run_in_one_call_and_keep_order() -> None:
    calls.clear()
    items = [{"x": np.full((2, 3), i, np.float32)} for i in range(4)]
    results = run_batch(_double, items)
    assert calls == [4]
    assert [r.batch_size for r in results] == [4, 4, 4, 4]
    for i, r in enumerate(results):
        assert r.ok
        np.testing.assert_array_equal(r.raise_for_error()["y"], np.full((2, 3), 2 * i))


def test_different_shapes_run_as_separate_stacks() -> None:
    calls.clear()
    items = [{"x": np.ones((2, 3), np.float32)}, {"x": np.ones((4, 3), np.float32)}]
    results = run_batch(_double, items)
    assert sorted(calls) == [1, 1]
    assert all(r.ok for r in results)
    assert results[1].raise_for_error()["y"].shape == (4, 3)


def test_invalid_item_gets_its_own_error_and_never_reaches_the_model() -> None:
    calls.clear()
    bad = np.ones((2, 3), np.float32)
    bad[0, 0] = np.nan
    results = run_batch(_double, [{"x": np.ones((2, 3), np.float32)}, {"x": bad}, "junk"])
    assert calls == [1]
    assert results[0].ok
    assert results[1].error is not None and "NaN" in results[1].error["message"]
    assert results[2].error is not None and results[2].error["code"] == "model_failure"


def test_item_that_crashes_the_model_fails_alone() -> None:
    calls.clear()
    items = [{"x": np.full((2,), v, np.float32)} for v in (1.0, -1.0, 3.0)]
    results = run_batch(_double, items)
    assert calls[0] == 3  # tried together first
    assert [r.ok for r in results] == [True, False, True]
    assert "negative input" in (results[1].error or {})["message"]
    np.testing.assert_array_equal(results[2].raise_for_error()["y"], [6.0, 6.0])
