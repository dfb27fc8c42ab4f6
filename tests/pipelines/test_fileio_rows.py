"""`fileio.load_npy_rows`: rows of a .npy file read by seeking, on local disk and on S3."""

import numpy as np
import pytest

from pipelines import fileio

ROW_SETS = [[0], [3], [0, 1, 2], [1, 2, 5, 6, 7, 39], list(range(40)), [39]]


def _array() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 2**32, size=(40, 7), dtype=np.uint32)


@pytest.mark.parametrize("rows", ROW_SETS)
def test_rows_of_a_local_file_equal_fancy_indexing(tmp_path, rows):
    array = _array()
    path = str(tmp_path / "a.npy")
    fileio.save_npy(path, array)
    np.testing.assert_array_equal(fileio.load_npy_rows(path, np.array(rows)), array[rows])


def test_no_rows_gives_an_empty_matrix(tmp_path):
    path = str(tmp_path / "a.npy")
    fileio.save_npy(path, _array())
    assert fileio.load_npy_rows(path, np.array([], dtype=np.int64)).shape == (0, 7)


def test_rows_of_a_file_on_s3(s3):
    fileio.configure([])  # this module's server, as a build configures its own at the start
    array = _array()
    path = s3.url("rows/a.npy")
    fileio.save_npy(path, array)
    for rows in ROW_SETS:
        np.testing.assert_array_equal(fileio.load_npy_rows(path, np.array(rows)), array[rows])


def test_a_one_dimensional_file_is_refused(tmp_path):
    path = str(tmp_path / "v.npy")
    fileio.save_npy(path, np.arange(5))
    with pytest.raises(ValueError, match="2-d"):
        fileio.load_npy_rows(path, np.array([1]))
