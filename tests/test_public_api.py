"""The public API is exactly what ``pixiu_kv.__all__`` lists, and every name is importable."""

import subprocess
import sys

import pixiu_kv

EXPECTED = {
    "BackgroundScope", "ConfigError", "GatewayConfig", "GatewayError", "KvCache",
    "KvCacheConfig", "RequestContext", "RouteHint", "__version__", "config_to_dict",
    "create_app", "load_config", "loads_config", "open_gateway", "open_kvcache",
    "open_kvcache_filter", "parse_config", "serve",
}


def test_public_api_is_the_documented_list() -> None:
    assert set(pixiu_kv.__all__) == EXPECTED
    for name in pixiu_kv.__all__:
        assert getattr(pixiu_kv, name) is not None, name


def test_public_names_are_not_private_modules() -> None:
    for name in pixiu_kv.__all__:
        module = getattr(getattr(pixiu_kv, name), "__module__", "pixiu_kv")
        assert module.startswith("pixiu_kv"), (name, module)


def test_request_path_never_imports_the_simulator() -> None:
    code = (
        "import sys, pixiu_kv, pixiu_kv.app, pixiu_kv.filters.llm_proxy, pixiu_kv.filters.kvcache;"
        "bad = sorted(m for m in sys.modules if m.startswith('pixiu_kv.sim') or m.startswith('benchmarks'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
