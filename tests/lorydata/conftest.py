"""Fixtures shared by the lorydata tests."""

import pytest

from lorydata.model_cache import CACHE_ENV


@pytest.fixture(scope="module")
def model_cache_dir(tmp_path_factory):
    """lory's model cache (distilled static models, ONNX exports) in a temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv(CACHE_ENV, str(folder))
        yield folder
