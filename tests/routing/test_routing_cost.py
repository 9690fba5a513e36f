"""The learned prefill cost and the reserved-work queue."""

from __future__ import annotations

import random

import pytest

from pixiu_kv.routing import PredictionLag, PrefillLearner, PrefillQueue
from pixiu_kv.routing._cost import KvOccupancy


@pytest.mark.parametrize(("true_per_token", "true_base"), [
    (1 / 2000, 0.05),   # engine 4x slower than the prior
    (1 / 30000, 0.01),  # engine ~4x faster than the prior
    (1 / 8000, 0.0),    # the prior was right
])
def test_learner_converges_to_the_observed_cost_per_token(true_per_token: float, true_base: float) -> None:
    rnd = random.Random(42)
    learner = PrefillLearner(per_token=1 / 8000, base=0.02, learning_rate=0.05)
    for i in range(400):
        tokens = rnd.randrange(0, 4000)
        ttft = (true_base + true_per_token * tokens) * rnd.uniform(0.9, 1.1)
        if i % 25 == 7:
            ttft *= 20  # a GC pause or a preemption: must not drag the fit away
        learner.learn(tokens, ttft)
    assert learner.per_token == pytest.approx(true_per_token, rel=0.1)
    assert learner.base == pytest.approx(true_base, abs=0.02)
    assert learner.samples == 400


def test_learner_keeps_the_prior_slope_when_the_data_cannot_identify_it() -> None:
    learner = PrefillLearner(per_token=1 / 8000, base=0.02)
    for _ in range(200):
        learner.learn(1000, 0.5)  # every prompt the same size
    assert learner.predict(1000) == pytest.approx(0.5, rel=0.05)
    assert 1 / 8000 / 100 <= learner.per_token <= 1 / 8000 * 100


def test_learner_ignores_garbage_samples() -> None:
    learner = PrefillLearner(per_token=1 / 8000, base=0.02)
    for bad in (float("nan"), float("inf")):
        learner.learn(100, bad)
    learner.learn(-5, 0.1)
    assert learner.samples == 0
    assert learner.per_token == 1 / 8000


def test_queue_adds_reservations_at_once_drains_with_time_and_forgets_finished_work() -> None:
    q = PrefillQueue()
    q.add(0.3, now=10.0)
    q.add(0.2, now=10.0)  # a burst: the second sees the first
    assert q.backlog(10.0) == pytest.approx(0.5)
    assert q.outstanding == 2
    assert q.backlog(10.1) == pytest.approx(0.4)
    q.prefilled(0.3, now=10.1)  # the first one's prefill is over: at most 0.2 can remain
    assert q.backlog(10.1) == pytest.approx(0.2)
    assert q.backlog(11.0) == 0.0
    q.ended()
    q.ended()
    q.ended()  # never negative
    assert q.outstanding == 0


def test_lag_follows_late_first_tokens_and_fades_when_the_engine_catches_up() -> None:
    lag = PredictionLag(half_life=1.0, weight=0.25)
    for i in range(20):
        lag.observe(0.4, now=i * 0.01)  # answers keep coming 0.4 s later than predicted
    assert lag.value(0.2) == pytest.approx(0.4, rel=0.05)
    assert lag.value(1.2) == pytest.approx(0.2, rel=0.05)  # one half-life without news
    lag.observe(-1.0, now=1.2)  # earlier than predicted: pulls towards zero, never below
    assert 0.0 <= lag.value(1.2) < 0.2


def test_kv_occupancy_counts_private_tokens_and_each_shared_prefix_once() -> None:
    kv = KvOccupancy()
    assert kv.needed(300, 11, 2048) == 2348  # the prefix is revived from the free blocks
    kv.hold(300, 11, 2048)
    assert kv.used == 2348
    assert kv.needed(300, 11, 2048) == 300  # a routed request already holds it
    kv.hold(300, 11, 2048)
    kv.hold(500, None, 0)
    assert kv.used == 2048 + 300 + 300 + 500
    kv.release(300, 11)
    assert kv.used == 2048 + 300 + 500  # still referenced once
    kv.release(300, 11)
    kv.release(500, None)
    assert kv.used == 0.0
    assert kv.needed(300, 11, 2048) == 2348


def test_kv_wait_is_a_share_of_a_lifetime_once_the_cache_is_full() -> None:
    kv = KvOccupancy(weight=0.5)
    kv.hold(8000, None, 0)
    assert kv.wait(4000, 10_000) == 0.0  # nothing ended here yet: no lifetime known
    kv.observe_lifetime(4.0)
    kv.observe_lifetime(8.0)
    assert kv.lifetime == 6.0  # first sample, then half of the way to the next
    kv.observe_lifetime(float("nan"))
    assert kv.lifetime == 6.0
    assert kv.wait(2000, 10_000) == 0.0  # fits
    assert kv.wait(4000, 10_000) == pytest.approx(6.0 * 2000 / 8000)  # a quarter of the holders must end
    assert kv.wait(50_000, 10_000) == 6.0  # at most everything here ends


@pytest.mark.parametrize("waited_share", [0.1, 0.3, 0.4])
def test_learner_follows_the_prefill_not_the_waits_on_top_of_it(waited_share: float) -> None:
    # A saturated engine: many TTFTs carry a wait the queue did not predict (for KV room,
    # behind the lane), never less than the prefill. The fit must stay near the prefill cost.
    rnd = random.Random(7)
    learner = PrefillLearner(per_token=1 / 8000, base=0.02, learning_rate=0.05)
    for _ in range(600):
        tokens = rnd.randrange(100, 4000)
        ttft = (0.01 + tokens / 10_000) * rnd.uniform(0.95, 1.05)
        if rnd.random() < waited_share:
            ttft += rnd.uniform(0.5, 5.0)
        learner.learn(tokens, ttft)
    assert learner.predict(2000) == pytest.approx(0.01 + 2000 / 10_000, rel=0.15)
    assert learner.per_token == pytest.approx(1 / 10_000, rel=0.15)
