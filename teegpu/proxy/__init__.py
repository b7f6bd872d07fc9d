"""The user's local proxy: verifies a teegpu enclave, then lets any OpenAI tool talk to it.

`run_proxy(ProxyConfig(upstream=...), VerifyConfig(...))` is what `teegpu proxy` calls.
"""
from teegpu.proxy.app import create_app, run_proxy
from teegpu.proxy.upstream import Upstream

__all__ = ["create_app", "run_proxy", "Upstream"]
