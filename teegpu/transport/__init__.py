"""ZeroMQ sockets for both sides. Imports protocol only, never trusted-side code."""
from teegpu.transport.curve import ClientCurve, ServerCurve, generate_keys
from teegpu.transport.endpoint import Endpoint, parse_endpoint, same_host_reason
from teegpu.transport.rpc_client import Reply, RpcClient, RpcStats
from teegpu.transport.rpc_server import Incoming, ServerSocket
from teegpu.transport.shm_region import ShmRegion

__all__ = ["ClientCurve", "ServerCurve", "generate_keys", "Endpoint", "parse_endpoint", "same_host_reason",
           "Reply", "RpcClient", "RpcStats", "Incoming", "ServerSocket", "ShmRegion"]
