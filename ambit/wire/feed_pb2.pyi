from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class ResourceKey(_message.Message):
    __slots__ = ("kind", "namespace", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    namespace: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ("key", "json")
    KEY_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    key: ResourceKey
    json: bytes
    def __init__(self, key: _Optional[_Union[ResourceKey, _Mapping]] = ..., json: _Optional[bytes] = ...) -> None: ...

class StateUpdate(_message.Message):
    __slots__ = ("version", "full", "upserts", "removals")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    UPSERTS_FIELD_NUMBER: _ClassVar[int]
    REMOVALS_FIELD_NUMBER: _ClassVar[int]
    version: int
    full: bool
    upserts: _containers.RepeatedCompositeFieldContainer[Resource]
    removals: _containers.RepeatedCompositeFieldContainer[ResourceKey]
    def __init__(self, version: _Optional[int] = ..., full: _Optional[bool] = ..., upserts: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ..., removals: _Optional[_Iterable[_Union[ResourceKey, _Mapping]]] = ...) -> None: ...
