"""The CA wire messages: istiod's `istio.v1.auth.IstioCertificateService` (security/proto/ca.proto).

The five fields are declared here as a descriptor and turned into message
classes at import, instead of committing protoc output: no generated file to
keep in step with the installed protobuf runtime, and the wire contract sits in
one readable place. Registered in a private descriptor pool so that a generated
copy of the same proto elsewhere in the process cannot clash with it.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

PACKAGE = "istio.v1.auth"
SERVICE = f"{PACKAGE}.IstioCertificateService"
METHOD = f"/{SERVICE}/CreateCertificate"

_F = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="ambit/istio/security/ca.proto",
        package=PACKAGE,
        syntax="proto3",
        dependency=["google/protobuf/struct.proto"],
    )
    req = fdp.message_type.add(name="IstioCertificateRequest")
    req.field.add(name="csr", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    req.field.add(name="validity_duration", number=2, type=_F.TYPE_INT64, label=_F.LABEL_OPTIONAL)
    req.field.add(
        name="metadata", number=3, type=_F.TYPE_MESSAGE, label=_F.LABEL_OPTIONAL,
        type_name=".google.protobuf.Struct",
    )
    resp = fdp.message_type.add(name="IstioCertificateResponse")
    resp.field.add(name="cert_chain", number=1, type=_F.TYPE_STRING, label=_F.LABEL_REPEATED)
    svc = fdp.service.add(name="IstioCertificateService")
    svc.method.add(
        name="CreateCertificate",
        input_type=f".{PACKAGE}.IstioCertificateRequest",
        output_type=f".{PACKAGE}.IstioCertificateResponse",
    )
    return fdp


_pool = descriptor_pool.DescriptorPool()
_struct = descriptor_pb2.FileDescriptorProto()
struct_pb2.DESCRIPTOR.CopyToProto(_struct)
_pool.Add(_struct)
_pool.Add(_file())

IstioCertificateRequest: Any = message_factory.GetMessageClass(
    _pool.FindMessageTypeByName(f"{PACKAGE}.IstioCertificateRequest")
)
IstioCertificateResponse: Any = message_factory.GetMessageClass(
    _pool.FindMessageTypeByName(f"{PACKAGE}.IstioCertificateResponse")
)


def encode_request(csr_pem: str, ttl_seconds: int, metadata: dict[str, str] | None = None) -> bytes:
    msg = IstioCertificateRequest(csr=csr_pem, validity_duration=ttl_seconds)
    for k, v in (metadata or {}).items():
        msg.metadata.fields[k].string_value = v
    return bytes(msg.SerializeToString())


def decode_request(data: bytes) -> tuple[str, int, dict[str, Any]]:
    """(csr, validity_duration, metadata as plain values); raises google.protobuf.message.DecodeError."""
    msg = IstioCertificateRequest.FromString(data)
    meta = {k: _value(v) for k, v in msg.metadata.fields.items()}
    return str(msg.csr), int(msg.validity_duration), meta


def _value(v: Any) -> Any:
    kind = v.WhichOneof("kind")
    if kind in (None, "null_value"):
        return None
    if kind in ("struct_value", "list_value"):
        return str(getattr(v, kind))  # only logged, never interpreted
    return getattr(v, kind)


def encode_response(chain_pem: list[str]) -> bytes:
    return bytes(IstioCertificateResponse(cert_chain=chain_pem).SerializeToString())


def decode_response(data: bytes) -> list[str]:
    return [str(c) for c in IstioCertificateResponse.FromString(data).cert_chain]
