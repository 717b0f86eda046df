"""runtime.row_threads: a batch's per-token kernels split over threads from Python."""

import numba
import numpy as np
import pytest

from llamachat.runtime.row_threads import over_rows, spans


def test_spans_cover_the_rows_once_in_near_equal_parts():
    assert spans(7, 2) == [(0, 3), (3, 7)]
    assert spans(1, 4) == [(0, 1)]  # never an empty span
    assert spans(10, 3) == [(0, 3), (3, 6), (6, 10)]


def test_every_row_is_done_once_and_a_span_error_reaches_the_caller():
    threads = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        out = np.zeros(9, np.int64)

        def add_one(start, stop, arr):
            arr[start:stop] += 1

        over_rows(add_one, 9, out)
        assert out.tolist() == [1] * 9

        def fails_past_the_first_row(start, stop):
            if stop > 1:
                raise ValueError("span failed")

        with pytest.raises(ValueError, match="span failed"):
            over_rows(fails_past_the_first_row, 4)
    finally:
        numba.set_num_threads(threads)
