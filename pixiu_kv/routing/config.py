"""Routing configuration: every capability of the router can be switched on or off alone.

Mounted in the kvcache filter's configuration as the ``[http_filters.config.routing]`` table
(see :func:`read_routing_config`). Defaults are the recommended production settings.
"""

from __future__ import annotations

from typing import Any

import attrs

from .._config_parse import FieldError, Table

__all__ = ["RoutingConfig", "TokenizerSpec", "read_routing_config"]

# Marks durations for the configuration dump (written back as "50ms"-style strings).
_DURATION = {"duration": True}


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise FieldError(attribute.name, value, "must be greater than 0")


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise FieldError(attribute.name, value, "must be >= 0")


def _ratio(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise FieldError(attribute.name, value, "is outside (0, 1]")


def _at_least_one(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 1.0:
        raise FieldError(attribute.name, value, "must be >= 1 (1 = perfectly even, no affinity slack)")


def _load_bound(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value != 0 and not value >= 1.0:
        raise FieldError(attribute.name, value, "must be 0 (off) or >= 1 (1 = no more than the mean load)")


def _block_size(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    # Engines cache whole blocks of a power-of-two size (vLLM: 16, LMCache chunks: 256); a
    # boundary that is not a multiple of the engine's block can never match its cache.
    if value < 1 or value > 4096 or value & (value - 1):
        raise FieldError(attribute.name, value, "must be a power of two in [1, 4096]")


@attrs.frozen(slots=True)
class TokenizerSpec:
    """A local tokenizer for ``model``: a ``tokenizer.json`` path, or ``builtin:sim``."""

    model: str
    path: str


def _tokenizer_specs(_: object, attribute: attrs.Attribute[Any], value: tuple[TokenizerSpec, ...]) -> None:
    models = [spec.model for spec in value]
    if len(set(models)) != len(models):
        raise FieldError(attribute.name, models, "names a model twice")
    for spec in value:
        if not spec.model or not spec.path:
            raise FieldError(attribute.name, (spec.model, spec.path), "needs a model name and a file path")


@attrs.frozen(slots=True)
class RoutingConfig:
    """How the router decides. Times are seconds, work is tokens.

    * ``prefix_index``: the local index of which prompt prefixes each endpoint holds, used
      when LMCache has no answer (first sight of a prompt, controller down, GPU-only cache).
      Prefixes are cut into blocks of ``block_size`` tokens near the start of a prompt and
      growing blocks further on (never more than ``max_block_size``), so a 4k-token prompt
      costs 48 hashes instead of 256 while a match is still exact to 1/8 of its length.
    * ``cost_model``: one predicted time-to-first-token per endpoint (queued prefill +
      uncached prefill + cached load + running requests), learned online per endpoint from
      the priors below. Off: the least-loaded eligible endpoint among the best cache matches.
    * ``affinity_load_factor``: the endpoint holding the deepest match keeps the request
      while its in-flight count is within this factor of the eligible endpoints' mean (+1),
      whatever the cost says (a copy's cost is more than its prefill when KV capacity binds:
      its blocks stay allocated through the decode); 0 leaves it to the cost.
    * ``new_prefix_spread``: a request whose prompt is mostly new to every eligible endpoint
      (the deepest match is under half of it) places a new prefix: among the endpoints about
      as fast as the cheapest (within the fixed cost plus what the match saves) and no more
      loaded, the one that got the fewest requests lately takes it, so new prefixes and the
      traffic that follows them spread evenly instead of gathering where a short common
      prefix (a system prompt) is cached.
    * ``overload_*``: an endpoint at ``overload_in_flight_ratio`` of its ``max_in_flight`` or
      with more than ``overload_queue_time`` of predicted queued prefill beyond the least
      queued eligible endpoint and more than the mean load per unit of weight gets no cache
      credit (relative: a uniformly saturated fleet keeps its cache affinity).
    * ``hot_spread``: a prefix whose share of traffic exceeds ``hot_threshold`` of one
      endpoint's fair share is placed on more endpoints (one more per threshold's worth).
    * ``compress_when_full``: when a request is sent where its prefix is cached (at least one
      LMCache chunk) and that endpoint has computed more tokens than its cache holds
      (``engine_cache_tokens``, else its learned capacity: it evicts), the kvcache filter
      asks LMCache to compress the prefix there, once per prefix and endpoint per
      ``hot_window``: a reused prefix then takes less room and more of them stay cached.
    * ``session_affinity``: without any cache signal, requests with the same session key (the
      ``session_header`` header, else the body's ``user``) go to the same endpoint by
      consistent hashing, bounded to ``session_load_factor`` x the mean load.
    """

    # Master switch. Off: the kvcache filter routes as Pixiu's reference does (LMCache lookup of
    # a cached prompt's tokens, best instance); on: this router decides every request.
    enabled: bool = False
    prefix_index: bool = True
    max_index_entries: int = attrs.field(default=500_000, validator=_positive)
    block_size: int = attrs.field(default=16, validator=_block_size)
    max_block_size: int = attrs.field(default=256, validator=_block_size)
    # Tokens an engine's cache holds (GPU and its LMCache tier together); 0: learned from the
    # engines' cached-token reports, unbounded until the first report shows an eviction.
    engine_cache_tokens: int = attrs.field(default=0, validator=_non_negative)
    # An engine's GPU KV cache in tokens (vLLM: "# GPU blocks" x block size), into which it
    # admits running requests; 0: admission waits are not modelled.
    engine_kv_tokens: int = attrs.field(default=0, validator=_non_negative)

    cost_model: bool = True
    prefill_tokens_per_second: float = attrs.field(default=8000.0, validator=_positive)
    cached_tokens_per_second: float = attrs.field(default=400_000.0, validator=_positive)
    base_latency: float = attrs.field(default=0.02, validator=_non_negative, metadata=_DURATION)
    running_request_cost: float = attrs.field(default=0.002, validator=_non_negative, metadata=_DURATION)
    learning_rate: float = attrs.field(default=0.05, validator=_ratio)
    # Ranking penalty, in units of the endpoint's own prefill time, for computing again the
    # tokens another eligible endpoint holds: a copy costs the fleet cache space.
    duplicate_cost_factor: float = attrs.field(default=1.0, validator=_non_negative)
    # Bounded-load affinity: the endpoint holding the deepest match keeps the request while
    # its in-flight count is at most this x the mean of the eligible endpoints (+1), even
    # when another looks faster by the cost alone. 0: the cost alone decides.
    affinity_load_factor: float = attrs.field(default=1.25, validator=_load_bound)
    # A mostly new prompt goes to the endpoint, of those about as fast as the cheapest, that
    # got the fewest requests lately (see the class docstring).
    new_prefix_spread: bool = True

    overload_in_flight_ratio: float = attrs.field(default=0.85, validator=_ratio)
    overload_queue_time: float = attrs.field(default=5.0, validator=_positive, metadata=_DURATION)

    hot_spread: bool = True
    hot_threshold: float = attrs.field(default=1.0, validator=_positive)
    hot_window: float = attrs.field(default=30.0, validator=_positive, metadata=_DURATION)
    hot_min_requests: float = attrs.field(default=8.0, validator=_positive)
    hot_min_tokens: int = attrs.field(default=256, validator=_positive)
    max_hot_prefixes: int = attrs.field(default=64, validator=_positive)

    # Compress a reused prefix where it is cached once that engine's cache is full (LMCache
    # /compress with cache_strategy.compress_method and compress_location).
    compress_when_full: bool = False

    session_affinity: bool = True
    session_header: str = "x-session-id"
    session_load_factor: float = attrs.field(default=1.25, validator=_at_least_one)

    max_pending: int = attrs.field(default=65_536, validator=_positive)
    reservation_timeout: float = attrs.field(default=600.0, validator=_positive, metadata=_DURATION)

    # Optional local tokenizers, ``[[...routing.tokenizers]]`` tables of ``model`` and ``path``:
    # a Hugging Face ``tokenizer.json``, or ``builtin:sim`` for the simulator's tokenizer.
    tokenizers: tuple[TokenizerSpec, ...] = attrs.field(default=(), validator=_tokenizer_specs)
    # Without a local tokenizer for the model, a prompt missing from the token cache is
    # tokenized by the engine (``/tokenize``) on the request path, within the routing budget
    # (``lookup_routing_timeout``, shared with the LMCache lookup), so its first request and
    # a conversation's next turn are routed by what the engines hold.
    tokenize_on_route: bool = True

    def __attrs_post_init__(self) -> None:
        if self.max_block_size < self.block_size:
            raise FieldError("max_block_size", self.max_block_size,
                             f"is smaller than block_size ({self.block_size})")
        if not self.session_header or self.session_header != self.session_header.lower():
            raise FieldError("session_header", self.session_header,
                             "must be a non-empty lower-case header name")


def read_routing_config(t: Table) -> RoutingConfig:
    """Read a ``routing`` table; absent keys take the defaults, unknown keys are rejected."""
    d = RoutingConfig()
    pairs: list[TokenizerSpec] = []
    for tt in t.tables("tokenizers"):
        pairs.append(TokenizerSpec(model=tt.text("model"), path=tt.text("path")))
        tt.close()
    return t.build(
        RoutingConfig,
        enabled=t.flag("enabled", d.enabled),
        prefix_index=t.flag("prefix_index", d.prefix_index),
        max_index_entries=t.integer("max_index_entries", d.max_index_entries, minimum=1),
        block_size=t.integer("block_size", d.block_size, minimum=1),
        max_block_size=t.integer("max_block_size", d.max_block_size, minimum=1),
        engine_cache_tokens=t.integer("engine_cache_tokens", d.engine_cache_tokens, minimum=0),
        engine_kv_tokens=t.integer("engine_kv_tokens", d.engine_kv_tokens, minimum=0),
        cost_model=t.flag("cost_model", d.cost_model),
        prefill_tokens_per_second=t.number("prefill_tokens_per_second", d.prefill_tokens_per_second),
        cached_tokens_per_second=t.number("cached_tokens_per_second", d.cached_tokens_per_second),
        base_latency=t.duration("base_latency", d.base_latency),
        running_request_cost=t.duration("running_request_cost", d.running_request_cost),
        learning_rate=t.number("learning_rate", d.learning_rate),
        duplicate_cost_factor=t.number("duplicate_cost_factor", d.duplicate_cost_factor, minimum=0),
        affinity_load_factor=t.number("affinity_load_factor", d.affinity_load_factor, minimum=0),
        new_prefix_spread=t.flag("new_prefix_spread", d.new_prefix_spread),
        overload_in_flight_ratio=t.number("overload_in_flight_ratio", d.overload_in_flight_ratio),
        overload_queue_time=t.duration("overload_queue_time", d.overload_queue_time, positive=True),
        hot_spread=t.flag("hot_spread", d.hot_spread),
        hot_threshold=t.number("hot_threshold", d.hot_threshold),
        hot_window=t.duration("hot_window", d.hot_window, positive=True),
        hot_min_requests=t.number("hot_min_requests", d.hot_min_requests),
        hot_min_tokens=t.integer("hot_min_tokens", d.hot_min_tokens, minimum=1),
        max_hot_prefixes=t.integer("max_hot_prefixes", d.max_hot_prefixes, minimum=1),
        compress_when_full=t.flag("compress_when_full", d.compress_when_full),
        session_affinity=t.flag("session_affinity", d.session_affinity),
        session_header=t.text("session_header", d.session_header).lower(),
        session_load_factor=t.number("session_load_factor", d.session_load_factor),
        max_pending=t.integer("max_pending", d.max_pending, minimum=1),
        reservation_timeout=t.duration("reservation_timeout", d.reservation_timeout, positive=True),
        tokenizers=tuple(pairs),
        tokenize_on_route=t.flag("tokenize_on_route", d.tokenize_on_route),
    )
