from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_FORMAT_UNSPECIFIED: _ClassVar[AdapterFormat]
    ADAPTER_FORMAT_PEFT_LORA: _ClassVar[AdapterFormat]
    ADAPTER_FORMAT_ORT_ADAPTER: _ClassVar[AdapterFormat]
    ADAPTER_FORMAT_WEIGHT_OVERRIDE: _ClassVar[AdapterFormat]
ADAPTER_FORMAT_UNSPECIFIED: AdapterFormat
ADAPTER_FORMAT_PEFT_LORA: AdapterFormat
ADAPTER_FORMAT_ORT_ADAPTER: AdapterFormat
ADAPTER_FORMAT_WEIGHT_OVERRIDE: AdapterFormat

class UploadFile(_message.Message):
    __slots__ = ("name", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class AdapterUploadHeader(_message.Message):
    __slots__ = ("model", "adapter_id", "format", "total_bytes", "sha256", "files", "pinned", "replace", "module_mapping_json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    MODULE_MAPPING_JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    adapter_id: str
    format: AdapterFormat
    total_bytes: int
    sha256: str
    files: _containers.RepeatedCompositeFieldContainer[UploadFile]
    pinned: bool
    replace: bool
    module_mapping_json: str
    def __init__(self, model: _Optional[str] = ..., adapter_id: _Optional[str] = ..., format: _Optional[_Union[AdapterFormat, str]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., files: _Optional[_Iterable[_Union[UploadFile, _Mapping]]] = ..., pinned: bool = ..., replace: bool = ..., module_mapping_json: _Optional[str] = ...) -> None: ...

class AdapterUploadTrailer(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class RegisterAdapterRequest(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: AdapterUploadHeader
    chunk: bytes
    trailer: AdapterUploadTrailer
    def __init__(self, header: _Optional[_Union[AdapterUploadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ..., trailer: _Optional[_Union[AdapterUploadTrailer, _Mapping]] = ...) -> None: ...

class RegisterAdapterFromPathRequest(_message.Message):
    __slots__ = ("model", "adapter_id", "format", "path", "pinned", "replace", "module_mapping_json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    MODULE_MAPPING_JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    adapter_id: str
    format: AdapterFormat
    path: str
    pinned: bool
    replace: bool
    module_mapping_json: str
    def __init__(self, model: _Optional[str] = ..., adapter_id: _Optional[str] = ..., format: _Optional[_Union[AdapterFormat, str]] = ..., path: _Optional[str] = ..., pinned: bool = ..., replace: bool = ..., module_mapping_json: _Optional[str] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("model", "adapter_id", "format", "rank", "targets", "size_bytes", "resident", "resident_bytes", "pinned", "created_at", "last_used_at", "sha256")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    model: str
    adapter_id: str
    format: AdapterFormat
    rank: int
    targets: _containers.RepeatedScalarFieldContainer[str]
    size_bytes: int
    resident: bool
    resident_bytes: int
    pinned: bool
    created_at: _timestamp_pb2.Timestamp
    last_used_at: _timestamp_pb2.Timestamp
    sha256: str
    def __init__(self, model: _Optional[str] = ..., adapter_id: _Optional[str] = ..., format: _Optional[_Union[AdapterFormat, str]] = ..., rank: _Optional[int] = ..., targets: _Optional[_Iterable[str]] = ..., size_bytes: _Optional[int] = ..., resident: bool = ..., resident_bytes: _Optional[int] = ..., pinned: bool = ..., created_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., sha256: _Optional[str] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("model", "adapter_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    adapter_id: str
    def __init__(self, model: _Optional[str] = ..., adapter_id: _Optional[str] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("model", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    next_page_token: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("model", "adapter_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    adapter_id: str
    def __init__(self, model: _Optional[str] = ..., adapter_id: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
