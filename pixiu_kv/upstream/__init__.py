"""Clients of the gateway's upstreams: engines, the LMCache controller, vLLM's ``/tokenize``."""

from .http11 import Http11Pool, Origin, UpstreamConnectError, UpstreamResponse, system_tls_context

__all__ = ["Http11Pool", "Origin", "UpstreamConnectError", "UpstreamResponse", "system_tls_context"]
