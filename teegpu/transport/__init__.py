"""ZeroMQ sockets for both sides. Imports protocol only, never trusted-side code."""
from teegpu.transport.endpoint import Endpoint, parse_endpoint, private_endpoint
from teegpu.transport.rpc_client import RpcClient, RpcStats
from teegpu.transport.rpc_server import ServerSocket

__all__ = ["Endpoint", "parse_endpoint", "private_endpoint", "RpcClient", "RpcStats", "ServerSocket"]
