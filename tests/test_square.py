"""Square attack (numpy) on a known linear model: finds adversarials, respects the threat model."""

import numpy as np
import pytest

from rcomp.export.square import margin, p_schedule, project_linf, square_attack

SHAPE = (3, 8, 8)


def linear_model(seed=0, classes=4):
    """logits = flatten(x) @ W.T + b: a model whose behaviour the test can reason about."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(classes, int(np.prod(SHAPE)))).astype(np.float32)
    b = rng.normal(size=classes).astype(np.float32)
    calls = {"n": 0}

    def predict(x):
        calls["n"] += len(x)
        return x.reshape(len(x), -1) @ w.T + b

    return predict, calls


def data(n=12, seed=1):
    rng = np.random.default_rng(seed)
    return rng.random((n,) + SHAPE, dtype=np.float32)


def test_large_eps_finds_adversarials_within_the_threat_model():
    predict, _ = linear_model()
    x = data()
    y = predict(x).argmax(1)  # all clean-correct
    eps = 0.3
    res = square_attack(predict, x, y, eps=eps, n_queries=200, seed=0)
    assert res.clean_correct.all()
    assert res.success.mean() >= 0.9
    assert res.adv_accuracy <= 0.1
    assert res.x_adv.dtype == np.float32 and res.x_adv.shape == x.shape
    assert np.abs(res.x_adv - x).max() <= eps
    assert np.abs(res.x_adv.astype(np.float64) - x).max() <= eps
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    fooled = predict(res.x_adv).argmax(1) != y
    np.testing.assert_array_equal(fooled, res.success)
    assert (res.queries[res.success] <= 200).all() and (res.queries >= 1).all()


def test_tiny_eps_keeps_correct_examples_and_skips_wrong_ones():
    predict, _ = linear_model()
    x = data()
    y = predict(x).argmax(1)
    y[:3] = (y[:3] + 1) % 4  # three examples misclassified from the start
    res = square_attack(predict, x, y, eps=1e-4, n_queries=20, seed=0)
    np.testing.assert_array_equal(res.clean_correct, np.arange(12) >= 3)
    np.testing.assert_array_equal(res.adv_correct, res.clean_correct)  # margins >> 1e-4 * |w|
    assert not res.success.any()
    assert (res.queries[:3] == 0).all() and (res.queries[3:] == 20).all()
    np.testing.assert_array_equal(res.x_adv[:3], x[:3])
    assert res.adv_accuracy == pytest.approx(0.75)


def test_seeded_and_query_budget_respected():
    predict, calls = linear_model()
    x = data(6)
    y = predict(x).argmax(1)
    a = square_attack(predict, x, y, eps=0.05, n_queries=30, seed=7)
    b = square_attack(predict, x, y, eps=0.05, n_queries=30, seed=7)
    np.testing.assert_array_equal(a.x_adv, b.x_adv)
    assert a.queries.max() <= 30


def test_projection_is_exact_in_float32():
    eps = 8 / 255
    x = np.linspace(0, 1, 4096, dtype=np.float32).reshape(1, 1, 64, 64)
    out = project_linf(x + np.float32(eps) * 1.0000001, x, eps)
    assert np.abs(out - x).max() <= eps
    assert np.abs(out.astype(np.float64) - x.astype(np.float64)).max() <= eps
    assert out.min() >= 0 and out.max() <= 1


def test_schedule_and_margin():
    assert p_schedule(0.05, 0, 10000) == 0.05
    assert p_schedule(0.05, 30, 10000) == 0.025
    assert p_schedule(0.05, 3, 1000) == 0.025  # rescaled to the budget: 3/1000 of 10k = 30
    assert p_schedule(0.05, 9999, 10000) == 0.05 / 512
    np.testing.assert_allclose(margin(np.array([[1.0, 3.0, 2.0]]), np.array([1])), [1.0])


def test_rejects_bad_inputs():
    predict, _ = linear_model()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        square_attack(predict, data() * 2, np.zeros(12, int), eps=0.1, n_queries=5)
    with pytest.raises(ValueError, match="eps"):
        square_attack(predict, data(), np.zeros(12, int), eps=0.0, n_queries=5)
