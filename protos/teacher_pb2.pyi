from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TargetSpec(_message.Message):
    __slots__ = ("method", "k", "p", "draws", "unique", "max_draws", "proposal_t", "k_head", "temperature", "seed")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    DRAWS_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAWS_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_T_FIELD_NUMBER: _ClassVar[int]
    K_HEAD_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    method: str
    k: int
    p: float
    draws: int
    unique: float
    max_draws: int
    proposal_t: float
    k_head: int
    temperature: float
    seed: int
    def __init__(self, method: _Optional[str] = ..., k: _Optional[int] = ..., p: _Optional[float] = ..., draws: _Optional[int] = ..., unique: _Optional[float] = ..., max_draws: _Optional[int] = ..., proposal_t: _Optional[float] = ..., k_head: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Rows(_message.Message):
    __slots__ = ("tokens", "rows", "seq_len", "document_ids")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    tokens: bytes
    rows: int
    seq_len: int
    document_ids: bytes
    def __init__(self, tokens: _Optional[bytes] = ..., rows: _Optional[int] = ..., seq_len: _Optional[int] = ..., document_ids: _Optional[bytes] = ...) -> None: ...

class DistillRequest(_message.Message):
    __slots__ = ("rows", "spec", "codec_version", "teacher_id", "rows_per_chunk", "extras")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CODEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    TEACHER_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    rows: Rows
    spec: TargetSpec
    codec_version: int
    teacher_id: str
    rows_per_chunk: int
    extras: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rows: _Optional[_Union[Rows, _Mapping]] = ..., spec: _Optional[_Union[TargetSpec, _Mapping]] = ..., codec_version: _Optional[int] = ..., teacher_id: _Optional[str] = ..., rows_per_chunk: _Optional[int] = ..., extras: _Optional[_Iterable[str]] = ...) -> None: ...

class DistillChunk(_message.Message):
    __slots__ = ("row_start", "row_count", "payload", "crc32", "row_keys")
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    ROW_KEYS_FIELD_NUMBER: _ClassVar[int]
    row_start: int
    row_count: int
    payload: bytes
    crc32: int
    row_keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, row_start: _Optional[int] = ..., row_count: _Optional[int] = ..., payload: _Optional[bytes] = ..., crc32: _Optional[int] = ..., row_keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("teacher_id", "tokenizer_fingerprint", "vocab_size", "max_rows", "max_tokens", "max_seq_len", "methods", "codec_versions", "server_version", "supports_documents", "batch_invariant", "backend")
    TEACHER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    CODEC_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_INVARIANT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    teacher_id: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_rows: int
    max_tokens: int
    max_seq_len: int
    methods: _containers.RepeatedScalarFieldContainer[str]
    codec_versions: _containers.RepeatedScalarFieldContainer[int]
    server_version: str
    supports_documents: bool
    batch_invariant: bool
    backend: str
    def __init__(self, teacher_id: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_rows: _Optional[int] = ..., max_tokens: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., methods: _Optional[_Iterable[str]] = ..., codec_versions: _Optional[_Iterable[int]] = ..., server_version: _Optional[str] = ..., supports_documents: _Optional[bool] = ..., batch_invariant: _Optional[bool] = ..., backend: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: Rows
    def __init__(self, rows: _Optional[_Union[Rows, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("logprob_sum", "token_count")
    LOGPROB_SUM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    logprob_sum: _containers.RepeatedScalarFieldContainer[float]
    token_count: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, logprob_sum: _Optional[_Iterable[float]] = ..., token_count: _Optional[_Iterable[int]] = ...) -> None: ...
