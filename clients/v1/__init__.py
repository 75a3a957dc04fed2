"""Generated gRPC stubs of the ``braintumor.v1`` API (``braintumor_pb2``, ``braintumor_pb2_grpc``); do not edit them,
change ``clients/proto/braintumor/v1/braintumor.proto`` and run ``python -m braintumor.clients.v1.generate``."""
