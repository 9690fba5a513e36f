"""Builds the optional C extension; all other metadata is in pyproject.toml.

Without a C compiler (or on a 32-bit interpreter) the extension is skipped and the router
runs the same loops in pure Python, with the same results (``pixiu_kv/routing/_blocks.py``,
``pixiu_kv/routing/_prefix_index.py``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("pixiu_kv.routing._blockhash", ["pixiu_kv/routing/_blockhash.c"], optional=True),
    ],
)
