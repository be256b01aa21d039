import pytest

from logitcast.server.backends import TransformersBackend


@pytest.fixture(scope="session")
def tiny_backend():
    return TransformersBackend.tiny_random(vocab_size=1000, seed=0)


@pytest.fixture
def corpus(tmp_path, tiny_backend):
    from tests.client.conftest import write_corpus

    return write_corpus(tmp_path / "tokens", fingerprint=tiny_backend.tokenizer_fingerprint)
