"""Per-endpoint time model: queued prefill work, and a learned prefill cost per token.

Everything is in seconds. An endpoint's predicted time to first token for a prompt is

    queue (its own predicted prefill work not yet drained)
  + running_request_cost x requests in flight   (decodes share the GPU with prefills)
  + base + per_token x uncached tokens            (learned online from observed TTFTs)
  + cached load cost x cached tokens              (moving cached KV in is not free)
"""

from __future__ import annotations

import math

__all__ = ["KvOccupancy", "PredictionLag", "PrefillLearner", "PrefillQueue"]

# The prior stays in the fit as this many pseudo-observations (two points on the prior
# line), so a slope that the data cannot identify (all prompts the same size) falls back to it.
_PRIOR_WEIGHT = 0.1
_PRIOR_TOKENS = 1024.0
# The learned costs stay within this factor of the prior: a broken clock or a pathological
# burst must not make an endpoint look free or unusable for ever.
_SLOPE_RANGE = 30.0
_MIN_MAX_BASE = 1.0
# Residuals beyond this many mean absolute residuals are clipped (outliers: GC pauses,
# preemptions, network hiccups).
_CLIP = 3.0
# A TTFT is the prefill plus waits the queue did not predict (KV room, a busy lane), never
# less than the prefill: excess is clipped closer than shortfall, so the fit follows the
# lower edge of the samples (the prefill cost) rather than their mean.
_CLIP_EXCESS = 1.0


class PrefillLearner:
    """Exponentially weighted least squares of ``ttft_work = base + per_token x tokens``.

    Robust: each sample's residual is clipped to a few mean absolute residuals before it
    enters the fit, and the result is bounded around the prior. O(1) per sample.
    """

    __slots__ = ("_decay", "_prior_base", "_prior_slope", "_scale", "_sw", "_sx", "_sxx", "_sxy",
                 "_sy", "base", "per_token", "samples")

    def __init__(self, per_token: float, base: float, learning_rate: float = 0.05) -> None:
        if not per_token > 0 or base < 0 or not 0 < learning_rate <= 1:
            raise ValueError("need per_token > 0, base >= 0, 0 < learning_rate <= 1")
        self._prior_slope = per_token
        self._prior_base = base
        self._decay = 1.0 - learning_rate
        self._sw = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._scale = -1.0  # mean absolute residual; < 0 until the first sample
        self.per_token = per_token
        self.base = base
        self.samples = 0

    def predict(self, tokens: float) -> float:
        return self.base + self.per_token * tokens

    def learn(self, tokens: float, seconds: float) -> None:
        """One observation: ``seconds`` of prefill for ``tokens`` uncached tokens."""
        if not (math.isfinite(seconds) and math.isfinite(tokens)) or tokens < 0:
            return
        predicted = self.predict(tokens)
        floor = max(0.1 * predicted, 1e-3)
        scale = max(self._scale if self._scale >= 0 else 0.5 * predicted, floor)
        residual = min(max(seconds - predicted, -_CLIP * scale), _CLIP_EXCESS * scale)
        self._scale = 0.9 * scale + 0.1 * abs(residual) if self._scale >= 0 else abs(residual)
        y = max(predicted + residual, 0.0)
        d = self._decay
        self._sw = self._sw * d + 1.0
        self._sx = self._sx * d + tokens
        self._sy = self._sy * d + y
        self._sxx = self._sxx * d + tokens * tokens
        self._sxy = self._sxy * d + tokens * y
        self.samples += 1
        self._fit()

    def _fit(self) -> None:
        # Data sums plus the prior line's two points (x=0 and x=_PRIOR_TOKENS) at fixed weight.
        w0 = _PRIOR_WEIGHT / 2
        y_ref = self._prior_base + self._prior_slope * _PRIOR_TOKENS
        sw = self._sw + 2 * w0
        sx = self._sx + w0 * _PRIOR_TOKENS
        sy = self._sy + w0 * (self._prior_base + y_ref)
        sxx = self._sxx + w0 * _PRIOR_TOKENS * _PRIOR_TOKENS
        sxy = self._sxy + w0 * _PRIOR_TOKENS * y_ref
        denominator = sw * sxx - sx * sx
        if denominator <= 0:
            return
        slope = (sw * sxy - sx * sy) / denominator
        slope = min(max(slope, self._prior_slope / _SLOPE_RANGE), self._prior_slope * _SLOPE_RANGE)
        base = (sy - slope * sx) / sw
        self.per_token = slope
        self.base = min(max(base, 0.0), max(_SLOPE_RANGE * self._prior_base, _MIN_MAX_BASE))


class PrefillQueue:
    """Predicted prefill work routed to one endpoint and not yet done, in seconds.

    Work is added when a request is routed (so a burst sees its own decisions), drains at
    one second per second (the engine works), and leaves for good when the request's first
    byte arrives or it ends. ``outstanding`` counts routed requests not yet ended;
    ``pending`` is the routed work not yet prefilled (0: nothing can be queued, a caller
    may skip :meth:`backlog`).
    """

    __slots__ = ("_backlog", "_since", "outstanding", "pending")

    def __init__(self) -> None:
        self._backlog = 0.0
        self.pending = 0.0
        self._since = -math.inf
        self.outstanding = 0

    def backlog(self, now: float) -> float:
        if now > self._since:
            if self._backlog > 0:
                self._backlog = max(0.0, self._backlog - (now - self._since))
            self._since = now
        return self._backlog

    def add(self, work: float, now: float) -> None:
        self.backlog(now)
        self._backlog += work
        self.pending += work
        self.outstanding += 1

    def prefilled(self, work: float, now: float) -> None:
        """A routed request's prefill is over: its work cannot still be queued."""
        self.backlog(now)
        self.pending = max(0.0, self.pending - work)
        self._backlog = min(self._backlog, self.pending)

    def ended(self) -> None:
        self.outstanding = max(0, self.outstanding - 1)


class KvOccupancy:
    """The GPU KV cache an endpoint's routed requests hold, and the admission wait it predicts.

    vLLM admits a waiting request only when its blocks fit in the GPU KV cache: its private
    blocks (the prompt tokens it did not find cached, and its output) and the cached blocks it
    revives (a cached prefix no running request references sits among the free blocks until
    one does). Both stay allocated until the requests using them end. ``used`` sums the
    private tokens of the requests routed here and not yet ended, and each prefix they share
    once (referenced by its deepest matched block key). A request that does not fit waits for
    enough of them to end; each holds its tokens for about ``lifetime`` seconds (learned from
    the requests that ended here), so tokens free up at ``used / lifetime`` per second and the
    wait is ``lifetime x overflow / used`` (at most one lifetime: by then every current
    request has ended).
    """

    __slots__ = ("_shared", "_weight", "lifetime", "used")

    def __init__(self, weight: float = 0.1) -> None:
        self._weight = weight
        self.used = 0.0
        self.lifetime = 0.0  # 0: no request ended here yet, no wait predicted
        # prefix key -> [requests referencing it, its tokens]; at most one per routed request
        self._shared: dict[int, list[float]] = {}

    def needed(self, private: float, prefix: int | None, prefix_tokens: float) -> float:
        """Tokens a request would add here: its private ones, and its matched prefix unless
        a routed request already references it."""
        if prefix is None or prefix in self._shared:
            return private
        return private + prefix_tokens

    def wait(self, tokens: float, capacity: float) -> float:
        used = self.used
        over = used + tokens - capacity
        if over <= 0.0 or used <= 0.0:
            return 0.0
        return self.lifetime * (over / used if over < used else 1.0)

    def hold(self, private: float, prefix: int | None, prefix_tokens: float) -> None:
        self.used += private
        if prefix is not None:
            entry = self._shared.get(prefix)
            if entry is None:
                self._shared[prefix] = [1.0, prefix_tokens]
                self.used += prefix_tokens
            else:
                entry[0] += 1.0

    def release(self, private: float, prefix: int | None) -> None:
        self.used -= private
        if prefix is not None:
            entry = self._shared.get(prefix)
            if entry is not None:
                entry[0] -= 1.0
                if entry[0] <= 0.0:
                    del self._shared[prefix]
                    self.used -= entry[1]
        if self.used < 1e-6:
            self.used = 0.0

    def observe_lifetime(self, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds >= 0.0):
            return
        if self.lifetime == 0.0:
            self.lifetime = seconds
        else:
            self.lifetime += self._weight * (seconds - self.lifetime)


class PredictionLag:
    """How much later than predicted an endpoint's first tokens arrived recently, in seconds.

    The queue above is open-loop (predicted work draining at one second per second); an
    engine slowed by what the model does not see (a large decode batch, another gateway's
    traffic, a noisy host) delivers later than that. Each observation moves the lag a
    ``weight`` of the way to the observed excess (never below zero); it fades with a
    ``half_life`` in seconds, since an engine that gets no new work catches up. ``level``
    is the value at the last update (0: :meth:`value` is 0 too).
    """

    __slots__ = ("_half_life", "_since", "_weight", "level")

    def __init__(self, half_life: float = 1.0, weight: float = 0.25) -> None:
        self._half_life = half_life
        self._weight = weight
        self.level = 0.0
        self._since = -math.inf

    def value(self, now: float) -> float:
        if self.level > 0.0 and now > self._since:
            self.level *= 0.5 ** ((now - self._since) / self._half_life)
            self._since = now
        return self.level

    def observe(self, excess: float, now: float) -> None:
        current = self.value(now)
        self.level = current + self._weight * (max(excess, 0.0) - current)
        self._since = max(now, self._since)
