"""Workload generators: deterministic for a seed, with the promised sharing shapes."""

from __future__ import annotations

import itertools
import random

import pytest

from benchmarks.workloads import (
    WORKLOAD_NAMES,
    build_workload,
    default_spec,
    default_token_counter,
    distinct_prefix_tokens,
    make_text,
    poisson_arrivals,
    render_request,
)

COUNT = default_token_counter()


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_same_seed_same_workload_other_seed_differs(name: str) -> None:
    spec = default_spec(name, quick=True)
    a = build_workload(spec, seed=3)
    b = build_workload(spec, seed=3)
    c = build_workload(spec, seed=4)
    assert a == b
    assert a.sessions != c.sessions


@pytest.mark.parametrize("target", [8, 17, 64, 700])
def test_make_text_is_close_to_the_token_target(target: int) -> None:
    text = make_text(random.Random(1), target, COUNT, lead="Lead.")
    assert target - 3 <= COUNT(text) <= target


def test_shared_prefix_groups_share_their_system_prompt_only() -> None:
    spec = default_spec("shared-prefix", quick=True)
    w = build_workload(spec, seed=1)
    assert len(w.sessions) == spec.groups * spec.per_group
    by_group: dict[str, set[str]] = {}
    for s in w.sessions:
        by_group.setdefault(s.prefix_group, set()).add(s.system)
        assert len(s.turns) == 1 and s.turns[0].max_tokens == spec.output_tokens
    assert len(by_group) == spec.groups
    assert all(len(systems) == 1 for systems in by_group.values())
    systems = [next(iter(v)) for v in by_group.values()]
    assert len(set(systems)) == spec.groups
    for system in systems:
        assert spec.system_tokens - 3 <= COUNT(system) <= spec.system_tokens
    questions = [s.turns[0].user for s in w.sessions]
    assert len(set(questions)) == len(questions)


def test_hot_prompt_has_one_system_prompt_for_everything() -> None:
    w = build_workload(default_spec("hot-prompt", quick=True), seed=2)
    assert len({s.system for s in w.sessions}) == 1
    assert len({s.turns[0].user for s in w.sessions}) == len(w.sessions)


def test_multi_turn_history_grows_with_the_real_answers() -> None:
    spec = default_spec("multi-turn", quick=True)
    w = build_workload(spec, seed=5)
    assert len({s.system for s in w.sessions}) == 1
    s = w.sessions[0]
    assert s.carry_history and len(s.turns) == spec.rounds
    answers = ["first real answer", "second real answer", "third"]
    bodies = [render_request(s, t, answers[:t], model="m") for t in range(3)]
    msgs = [b["messages"] for b in bodies]
    assert isinstance(msgs[0], list) and isinstance(msgs[2], list)
    # Each turn's conversation is the previous one plus the answer and the next question.
    assert msgs[1][: len(msgs[0])] == msgs[0]
    assert msgs[1][len(msgs[0])] == {"role": "assistant", "content": "first real answer"}
    assert msgs[2][: len(msgs[1])] == msgs[1]
    assert len(msgs[2]) == len(msgs[0]) + 4
    with pytest.raises(ValueError):
        render_request(s, 2, answers[:1], model="m")


def test_long_doc_questions_share_their_document() -> None:
    spec = default_spec("long-doc", quick=True)
    w = build_workload(spec, seed=1)
    docs: dict[str, set[str]] = {}
    for s in w.sessions:
        docs.setdefault(s.prefix_group, set()).add(s.context)
    assert len(docs) == spec.groups and all(len(d) == 1 for d in docs.values())
    body = render_request(w.sessions[0], 0, [], model="m")
    assert isinstance(body["messages"], list)
    assert body["messages"][-1]["content"].startswith(w.sessions[0].context)


def test_no_reuse_control_shares_no_prefix() -> None:
    w = build_workload(default_spec("no-reuse", quick=True), seed=1)
    prompts = [str(render_request(s, 0, [], model="m")["prompt"]) for s in w.sessions]
    firsts = {p.split()[0] for p in prompts}
    assert len(firsts) == len(prompts)  # differ from the very first word
    assert all(s.prefix_group == "" for s in w.sessions)
    assert distinct_prefix_tokens(w.spec) == 0


def test_completion_api_renders_a_prompt_and_chat_renders_messages() -> None:
    spec = default_spec("shared-prefix", quick=True)
    comp = build_workload(spec, seed=1)
    chat = build_workload(spec, seed=1, api="chat")
    b1 = render_request(comp.sessions[0], 0, [], model="m")
    b2 = render_request(chat.sessions[0], 0, [], model="m")
    assert isinstance(b1["prompt"], str) and b1["prompt"].startswith(comp.sessions[0].system)
    assert "messages" in b2 and b2["max_tokens"] == spec.output_tokens


def test_poisson_arrivals_are_seeded_increasing_and_near_the_rate() -> None:
    a = poisson_arrivals(2000, 10.0, seed=1)
    assert a == poisson_arrivals(2000, 10.0, seed=1)
    assert a != poisson_arrivals(2000, 10.0, seed=2)
    assert all(x <= y for x, y in itertools.pairwise(a))
    assert 150 < a[-1] < 250  # 2000 arrivals at 10/s take about 200 s


def test_distinct_prefix_tokens_counts_each_shared_prefix_once() -> None:
    spec = default_spec("shared-prefix", quick=True)
    assert distinct_prefix_tokens(spec) == spec.groups * spec.system_tokens
    hot = default_spec("hot-prompt", quick=True)
    assert distinct_prefix_tokens(hot) == hot.system_tokens
