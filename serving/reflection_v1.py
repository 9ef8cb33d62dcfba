"""Server reflection `grpc.reflection.v1` beside `v1alpha`.

grpcio-reflection ships only `grpc.reflection.v1alpha`; clients written against the published
v1 contract (grpcurl, Postman, recent grpc-js tools) get UNIMPLEMENTED from it. The v1 protocol
has the same messages with the same field numbers under the package `grpc.reflection.v1`, so
its bytes are v1alpha's bytes: the v1 service is the v1alpha servicer registered under the v1
method name. The v1 file descriptor, derived from the shipped v1alpha one by renaming its
package, joins the default descriptor pool, so reflection can describe v1 itself.

Example::

    from grpc_reflection.v1alpha import reflection
    from metaprune.serving import reflection_v1

    names = (SERVICE_NAME, reflection.SERVICE_NAME, reflection_v1.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)      # v1alpha
    reflection_v1.enable_server_reflection(names, server)   # v1, same answers
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

PACKAGE = "grpc.reflection.v1"
SERVICE_NAME = f"{PACKAGE}.ServerReflection"
FILE_NAME = "grpc/reflection/v1/reflection.proto"
_ALPHA = f".{v1alpha.DESCRIPTOR.package}."


def _renamed(type_name: str) -> str:
    return f".{PACKAGE}.{type_name[len(_ALPHA):]}" if type_name.startswith(_ALPHA) else type_name


def _rename_messages(messages) -> None:
    for message in messages:
        for field in message.field:
            if field.HasField("type_name"):  # messages and enums only
                field.type_name = _renamed(field.type_name)
        _rename_messages(message.nested_type)


def file_descriptor():
    """The `grpc/reflection/v1/reflection.proto` descriptor (added to the default pool once)."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(FILE_NAME)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = FILE_NAME, PACKAGE
    proto.ClearField("options")  # v1alpha's java/go package names
    _rename_messages(proto.message_type)
    for service in proto.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type)
            method.output_type = _renamed(method.output_type)
    return pool.AddSerializedFile(proto.SerializeToString())


def message_class(name: str):
    """A v1 message class by name, e.g. ``message_class("ServerReflectionRequest")``."""
    return message_factory.GetMessageClass(file_descriptor().message_types_by_name[name])


def enable_server_reflection(service_names, server: grpc.aio.Server) -> None:
    """Serve `grpc.reflection.v1.ServerReflection` on an aio server (v1alpha's answers)."""
    file_descriptor()
    servicer = reflection.aio.ReflectionServicer(service_names)
    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            # wire-identical messages: v1 bytes parse as v1alpha and back
            request_deserializer=v1alpha.ServerReflectionRequest.FromString,
            response_serializer=v1alpha.ServerReflectionResponse.SerializeToString),
    })
    server.add_generic_rpc_handlers((handler,))
