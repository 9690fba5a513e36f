"""Simulated vLLM engines with LMCache, and an LMCache controller emulator.

Never imported by the request path.
"""
