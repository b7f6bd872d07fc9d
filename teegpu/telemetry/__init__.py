"""Per-RPC telemetry (trusted side): the records, the JSON Lines log and its analyzer."""
from teegpu.telemetry.rpc_log import COMPONENTS, SCHEMA_VERSION, RpcTelemetry

__all__ = ["COMPONENTS", "SCHEMA_VERSION", "RpcTelemetry"]
