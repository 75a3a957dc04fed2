"""API-key authentication of the gRPC API: every method except health and reflection needs the key."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from .api_key import ApiKeys
from .errors import Unauthenticated
from .metrics import Metrics

OPEN_SERVICES = (health.SERVICE_NAME, reflection.SERVICE_NAME)  # reachable without the API key
AUTH_HELP = "missing or wrong API key: send it as metadata `x-api-key: KEY` or `authorization: Bearer KEY`"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every method except health and reflection needs one of the keys (``x-api-key`` or ``authorization: Bearer``)."""

    def __init__(self, keys: ApiKeys, metrics: Metrics | None = None) -> None:
        if not keys:
            raise ValueError("ApiKeyInterceptor needs at least one key")
        self._keys = keys
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method  # "/package.Service/Method"
        if handler is None or method.split("/")[1] in OPEN_SERVICES:
            return handler
        if self._authorised(handler_call_details.invocation_metadata):
            return handler
        return _refusing(handler, method.rsplit("/", 1)[-1], self._metrics)

    def _authorised(self, metadata) -> bool:
        return self._keys.caller(metadata or ()) is not None


def _refusing(handler: grpc.RpcMethodHandler, rpc: str, metrics: Metrics | None) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED without running it."""

    async def refuse(_request, context):
        if metrics is not None:
            metrics.observe_error(Unauthenticated(AUTH_HELP))
            metrics.observe_request(rpc, "UNAUTHENTICATED", 0.0)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTH_HELP)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
