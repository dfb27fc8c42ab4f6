import pytest

from tests.lorytrain.runkit import make_corpus


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory):
    """(train, heldout) shard folders of real sample text, seq_len 64."""
    return make_corpus(tmp_path_factory.mktemp("text_shards"))
