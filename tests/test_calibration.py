import numpy as np
import pytest

from rollout.calibration import ece, reliability, sharpness


def test_perfectly_calibrated_is_zero():
    # in each bin the outcome frequency equals the forecast: 0.1 -> 1 of 10, 0.5 -> 2 of 4, 0.75 -> 3 of 4
    q = [0.1] * 10 + [0.5] * 4 + [0.75] * 4
    o = [1] + [0] * 9 + [1, 1, 0, 0] + [1, 1, 1, 0]
    assert ece(q, o) == pytest.approx(0.0, abs=1e-12)


def test_overconfident_by_hand():
    # ten forecasts of 0.9, six come true: |0.9 - 0.6| = 0.3
    assert ece([0.9] * 10, [1] * 6 + [0] * 4) == pytest.approx(0.3)


def test_weighted_over_bins_by_hand():
    # bin [0.2, 0.3): 2 forecasts of 0.2, 1 of 2 true -> gap 0.3, weight 2/8
    # bin [0.8, 0.9): 6 forecasts of 0.8, all true    -> gap 0.2, weight 6/8
    q = [0.2, 0.2] + [0.8] * 6
    o = [1, 0] + [1] * 6
    assert ece(q, o) == pytest.approx(2 / 8 * 0.3 + 6 / 8 * 0.2)  # 0.225


def test_within_a_bin_the_means_are_compared():
    # 0.12 and 0.18 share the bin [0.1, 0.2): mean 0.15 against frequency 0.5
    assert ece([0.12, 0.18], [1, 0]) == pytest.approx(0.35)
    assert ece([0.12, 0.18], [1, 0], bins=20) == pytest.approx(0.5 * 0.88 + 0.5 * 0.18)


def test_bin_edges():
    r = reliability([0.0, 0.1, 0.3, 0.299, 0.95, 1.0], [0, 0, 1, 0, 1, 1])
    assert r.count.tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 2]  # 0.3 opens its bin, 1.0 closes the last
    assert r.mean_forecast[9] == pytest.approx(0.975)
    assert r.observed[3] == 1.0
    assert np.isnan(r.mean_forecast[5]) and np.isnan(r.observed[5])


def test_soft_targets_and_nan_pairs():
    # targets may be probabilities (calibration to a market); NaN pairs are left out
    assert ece([0.3, 0.3, np.nan, 0.7], [0.5, 0.3, 1.0, np.nan]) == pytest.approx(0.1)
    assert np.isnan(ece([np.nan], [1.0]))


def test_sharpness():
    assert sharpness([0.5, 0.5]) == 0.0
    assert sharpness([0.0, 1.0, 1.0]) == 0.5
    assert sharpness([0.2, 0.9, np.nan]) == pytest.approx(0.35)
    # calibration says nothing about sharpness: the base rate is calibrated but not sharp
    o = np.array([1] * 3 + [0] * 7)
    assert ece(np.full(10, 0.3), o) == pytest.approx(0.0)
    assert sharpness(np.full(10, 0.3)) == pytest.approx(0.2)


def test_bad_input():
    with pytest.raises(ValueError, match="2 forecasts but 3 targets"):
        ece([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ece([1.2], [1])
