"""models/formats/xgboost_models.py: the XGBoost predictor's direct C call against XGBoost's own
Python API."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import xgboost as xgb

from models.formats.common import Format
from models.formats.xgboost_models import dense_predict, load_xgboost
from models.signature import OUTPUT_LABEL, OUTPUT_PROBA, Task


def booster(n_classes: int, n_features: int = 7, seed: int = 0) -> xgb.Booster:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, n_features)).astype(np.float32)
    y = rng.integers(0, n_classes, size=300)
    params = {"max_depth": 4, "nthread": 1, "seed": seed}
    if n_classes == 2:
        params["objective"] = "binary:logistic"
    else:
        params |= {"objective": "multi:softprob", "num_class": n_classes}
    return xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=20)


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("rows", [1, 3, 64, 1000])
def test_direct_call_matches_inplace_predict(n_classes: int, rows: int) -> None:
    b = booster(n_classes)
    x = np.random.default_rng(rows).normal(scale=3, size=(rows, 7)).astype(np.float32)
    got = dense_predict(b)(x)
    want = b.inplace_predict(x)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_direct_call_takes_float64_and_non_contiguous_rows() -> None:
    b = booster(3)
    x = np.random.default_rng(1).normal(size=(20, 14))[:, ::2]  # float64, strided
    np.testing.assert_array_equal(
        dense_predict(b)(x), b.inplace_predict(np.ascontiguousarray(x, np.float32))
    )


def test_misaligned_rows_are_realigned() -> None:
    b = booster(2)
    want = np.random.default_rng(4).normal(size=(3, 7)).astype(np.float32)
    raw = bytearray(1 + want.nbytes)
    x = np.frombuffer(raw, dtype=np.float32, count=want.size, offset=1).reshape(3, 7)
    raw[1:] = want.tobytes()  # x is a view of raw at byte offset 1
    assert not x.flags.aligned
    np.testing.assert_array_equal(dense_predict(b)(x), b.inplace_predict(want))


def test_result_is_a_copy_not_xgboosts_buffer() -> None:
    predict = dense_predict(booster(2))
    gc.collect()  # the predictor alone keeps the booster (and its C handle) alive
    rng = np.random.default_rng(2)
    first = predict(rng.normal(size=(5, 7)))
    kept = first.copy()
    predict(rng.normal(size=(5, 7)) + 10)  # XGBoost reuses its output buffer for this call
    np.testing.assert_array_equal(first, kept)


def test_wrong_feature_count_is_refused() -> None:
    with pytest.raises(ValueError, match="Feature shape mismatch, expected: 7"):
        dense_predict(booster(2))(np.zeros((2, 6), np.float32))


def test_binary_model_answers_both_class_probabilities() -> None:
    b = booster(2)
    x = np.random.default_rng(3).normal(size=(4, 7)).astype(np.float32)
    loaded = load_xgboost(b, Format.SERVERY, {}, None, 1)
    assert loaded.signature.task is Task.CLASSIFICATION
    out = loaded.predict(x)
    proba = out[OUTPUT_PROBA]
    assert proba.shape == (4, 2)
    np.testing.assert_array_equal(out[OUTPUT_LABEL], proba.argmax(axis=1))
    np.testing.assert_allclose(proba[:, 1], b.inplace_predict(x), rtol=0, atol=0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
