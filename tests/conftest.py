import pytest

from logitcast.server.backends import TransformersBackend


@pytest.fixture(scope="session")
def tiny_backend():
    return TransformersBackend.tiny_random(vocab_size=1000, seed=0)
