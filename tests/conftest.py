import pytest

from logitcast.server.backends import TransformersBackend


@pytest.fixture(scope="session")
def tiny_backend():
    return TransformersBackend.tiny_random(vocab_size=1000, seed=0)


@pytest.fixture
def corpus(tmp_path, tiny_backend):
    from tests.data.conftest import write_corpus

    return write_corpus(tmp_path / "tokens", fingerprint=tiny_backend.tokenizer_fingerprint)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the session; yields its endpoint URL. The AWS_*
    variables point boto/s3fs (and spawned child processes) at it, restored at the end."""
    import logging
    import os

    from moto.server import ThreadedMotoServer

    werkzeug = logging.getLogger("werkzeug")  # one INFO line per request otherwise
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)  # each would override the variables above
        for name in ("NO_PROXY", "no_proxy"):
            mp.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1"])))
        try:
            yield endpoint
        finally:
            server.stop()
            werkzeug.setLevel(level)


@pytest.fixture
def s3_url(s3_server):
    """A fresh, empty bucket on the moto server: "s3://<bucket>/cache"."""
    import uuid

    import s3fs

    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/cache"
