"""Which validation slices a figure shows: spread over the split, not its first few."""

import numpy as np

from tskd_tune.data.inspect import spread_indices


def test_slices_are_spread_over_the_split_first_and_last_included():
    val = np.arange(100, 140)  # 40 consecutive slices of a held-out volume
    chosen = spread_indices(val, 6)
    assert chosen.tolist() == [100, 108, 116, 123, 131, 139]
    assert len(set(chosen.tolist())) == 6 and chosen[0] == val[0] and chosen[-1] == val[-1]


def test_a_split_of_n_or_fewer_is_shown_whole():
    assert spread_indices(np.array([3, 9, 4]), 6).tolist() == [3, 9, 4]
    assert spread_indices(np.arange(6), 6).tolist() == list(range(6))
    assert spread_indices(np.arange(10), 1).tolist() == [0]


def test_slices_with_foreground_are_preferred_when_there_are_enough():
    val = np.arange(20)
    fg = np.where((val >= 5) & (val < 15), 100, 0)  # the ends of the volume hold no structure
    assert spread_indices(val, 3, foreground=fg).tolist() == [5, 9, 14]
    # fewer slices with foreground than asked for: spread over all of them instead
    assert spread_indices(val, 3, foreground=np.where(val == 7, 1, 0)).tolist() == [0, 10, 19]
