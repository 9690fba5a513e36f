"""Seeded, reproducible workload generators.

A workload is a list of :class:`Session` objects. A session is a sequence of turns that run
one after the other (a user's chat rounds); independent requests are sessions of one turn.
Generators are pure: the same spec and seed always give the same sessions, and nothing here
does I/O. Lengths are in tokens of the simulated engines' tokenizer (see
:func:`default_token_counter`), so prefix sharing and cache capacity can be reasoned about
in the units the engines use.

Shapes follow the peers' benchmarks: SGLang's ``generated-shared-prefix`` (groups x prompts,
system prompt, question, output), production-stack's multi-round QA (users x rounds, shared
system prompt, per-user history growing with each real answer), long-document QA, a single
hot system prompt for everything, and a no-reuse control.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from typing import Literal

import attrs

__all__ = [
    "WORKLOAD_NAMES",
    "Api",
    "Session",
    "TokenCounter",
    "Turn",
    "Workload",
    "WorkloadSpec",
    "build_workload",
    "default_spec",
    "default_token_counter",
    "distinct_prefix_tokens",
    "make_text",
    "poisson_arrivals",
    "render_request",
]

Api = Literal["chat", "completion"]
TokenCounter = Callable[[str], int]

WORKLOAD_NAMES = ("shared-prefix", "multi-turn", "long-doc", "hot-prompt", "no-reuse")

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def _approx_count(text: str) -> int:
    return len(_WORD_RE.findall(text))


def default_token_counter() -> TokenCounter:
    """The simulated engines' tokenizer when it is available, else a word/punctuation count."""
    try:
        from pixiu_kv.sim.tokenizer import tokenize
    except ImportError:
        return _approx_count
    return lambda text: len(tokenize(text))


# -- text ---------------------------------------------------------------------------------

_SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "sa", "vo", "ne", "di", "por", "el", "an", "qu", "ith",
              "mar", "zo", "bel", "fa", "gor", "hu", "is", "ja", "ko", "lum", "ny", "os", "pre", "ru")


def _vocabulary() -> tuple[str, ...]:
    # Fixed, seed-independent vocabulary: the workload seed picks words, not the lexicon.
    rng = random.Random(7)
    words: set[str] = set()
    while len(words) < 4000:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))))
    return tuple(sorted(words))


_VOCAB = _vocabulary()


def make_text(rng: random.Random, n_tokens: int, count: TokenCounter, *, lead: str = "") -> str:
    """Random prose of about ``n_tokens`` tokens (by ``count``), starting with ``lead``.

    Words are drawn from ``rng``; the word count is first estimated from per-word costs and
    then corrected against ``count`` of the whole text, so the result is reproducible and at
    most ``n_tokens`` long (within a token or two of it for word-based tokenizers).
    """
    if n_tokens <= 0:
        return lead
    words = [rng.choice(_VOCAB) for _ in range(n_tokens)]
    costs = [max(1, _word_cost(w, count)) for w in words]

    def text_of(k: int) -> str:
        body = " ".join(words[:k])
        return f"{lead} {body}" if lead else body

    budget = n_tokens - (count(lead) if lead else 0)
    k = 0
    used = 0
    while k < len(words) and used + costs[k] <= budget:
        used += costs[k]
        k += 1
    k = max(1, k)
    # Correct the estimate (tokenizers may merge across word boundaries).
    while k > 1 and count(text_of(k)) > n_tokens:
        k -= 1
    while k < len(words) and count(text_of(k + 1)) <= n_tokens:
        k += 1
    return text_of(k)


_WORD_COSTS: dict[tuple[TokenCounter, str], int] = {}


def _word_cost(word: str, count: TokenCounter) -> int:
    key = (count, word)
    cost = _WORD_COSTS.get(key)
    if cost is None:
        if len(_WORD_COSTS) > 100_000:
            _WORD_COSTS.clear()
        cost = _WORD_COSTS[key] = count(" " + word)
    return cost


# -- data ---------------------------------------------------------------------------------

@attrs.frozen
class Turn:
    """One request of a session: the user's text and the output length asked for."""

    user: str
    max_tokens: int = attrs.field(validator=attrs.validators.ge(1))


@attrs.frozen
class Session:
    """Turns sent one after the other; with ``carry_history`` each turn sees the earlier ones.

    ``prefix_group`` names the prefix the session shares with others (``""`` for none) and
    ``shared_tokens`` is the expected length of that shared prefix in tokens.
    """

    session_id: str
    api: Api
    system: str
    context: str
    turns: tuple[Turn, ...]
    prefix_group: str
    shared_tokens: int
    carry_history: bool = False


@attrs.frozen
class Workload:
    name: str
    sessions: tuple[Session, ...]
    spec: WorkloadSpec

    @property
    def request_count(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


@attrs.frozen
class WorkloadSpec:
    """Sizes of a workload, in tokens of the sim tokenizer.

    ``groups`` x ``per_group`` sessions; each has ``rounds`` turns. ``system_tokens`` is shared
    by a group (by everything for ``hot-prompt``, by everyone for ``multi-turn``),
    ``context_tokens`` is per group (the document of ``long-doc``) or per user (the history
    of ``multi-turn``), ``question_tokens`` per turn, ``output_tokens`` asked per turn.
    """

    name: str
    groups: int = attrs.field(validator=attrs.validators.ge(1))
    per_group: int = attrs.field(validator=attrs.validators.ge(1))
    system_tokens: int = attrs.field(validator=attrs.validators.ge(0))
    question_tokens: int = attrs.field(validator=attrs.validators.ge(1))
    output_tokens: int = attrs.field(validator=attrs.validators.ge(1))
    rounds: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    context_tokens: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    api: Api = "chat"


def default_spec(name: str, *, quick: bool = False) -> WorkloadSpec:
    """Sizes modelled on the peers' presets; ``quick`` shrinks them to run in seconds."""
    if name == "shared-prefix":
        # SGLang generated-shared-prefix: 64 groups x 16 prompts, 2048 / 128 / 256 tokens.
        return (WorkloadSpec(name, groups=16, per_group=3, system_tokens=512, question_tokens=32,
                             output_tokens=8, api="completion") if quick else
                WorkloadSpec(name, groups=64, per_group=16, system_tokens=2048, question_tokens=128,
                             output_tokens=256, api="completion"))
    if name == "multi-turn":
        # production-stack multi-round QA: shared 1000-token system prompt, per-user history,
        # 100-token answers fed back into the next round.
        return (WorkloadSpec(name, groups=1, per_group=12, rounds=4, system_tokens=256,
                             context_tokens=768, question_tokens=32, output_tokens=8) if quick else
                WorkloadSpec(name, groups=1, per_group=80, rounds=6, system_tokens=1000,
                             context_tokens=2000, question_tokens=64, output_tokens=100))
    if name == "long-doc":
        return (WorkloadSpec(name, groups=6, per_group=8, system_tokens=64, context_tokens=1024,
                             question_tokens=32, output_tokens=8) if quick else
                WorkloadSpec(name, groups=8, per_group=48, system_tokens=128, context_tokens=8192,
                             question_tokens=64, output_tokens=64))
    if name == "hot-prompt":
        return (WorkloadSpec(name, groups=1, per_group=48, system_tokens=512, question_tokens=32,
                             output_tokens=8) if quick else
                WorkloadSpec(name, groups=1, per_group=600, system_tokens=2048, question_tokens=128,
                             output_tokens=128))
    if name == "no-reuse":
        return (WorkloadSpec(name, groups=40, per_group=1, system_tokens=0, question_tokens=544,
                             output_tokens=8, api="completion") if quick else
                WorkloadSpec(name, groups=400, per_group=1, system_tokens=0, question_tokens=2176,
                             output_tokens=128, api="completion"))
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)}")


def build_workload(spec: WorkloadSpec, *, seed: int, count: TokenCounter | None = None,
                   api: Api | None = None) -> Workload:
    """Generate the sessions of ``spec`` deterministically from ``seed``; order is shuffled."""
    count = count or default_token_counter()
    rng = random.Random(f"{spec.name}:{seed}")
    use_api: Api = api or spec.api
    sessions: list[Session] = []
    name = spec.name
    if name in ("shared-prefix", "hot-prompt"):
        hot = make_text(rng, spec.system_tokens, count, lead="System 0.") if name == "hot-prompt" else ""
        for g in range(spec.groups):
            system = hot or make_text(rng, spec.system_tokens, count, lead=f"System {g}.")
            for i in range(spec.per_group):
                sessions.append(Session(
                    session_id=f"g{g}-p{i}", api=use_api, system=system, context="",
                    turns=(Turn(make_text(rng, spec.question_tokens, count, lead=f"Question {i}."),
                                spec.output_tokens),),
                    prefix_group=f"g{0 if hot else g}", shared_tokens=spec.system_tokens))
    elif name == "multi-turn":
        system = make_text(rng, spec.system_tokens, count, lead="Assistant rules.")
        for g in range(spec.groups):
            for u in range(spec.per_group):
                context = make_text(rng, spec.context_tokens, count, lead=f"User {g}-{u} profile.")
                turns = tuple(Turn(make_text(rng, spec.question_tokens, count, lead=f"Round {r}."),
                                   spec.output_tokens) for r in range(spec.rounds))
                sessions.append(Session(
                    session_id=f"u{g}-{u}", api=use_api, system=system, context=context, turns=turns,
                    prefix_group=f"u{g}-{u}", shared_tokens=spec.system_tokens + spec.context_tokens,
                    carry_history=True))
    elif name == "long-doc":
        system = make_text(rng, spec.system_tokens, count, lead="Answer from the document.")
        for g in range(spec.groups):
            document = make_text(rng, spec.context_tokens, count, lead=f"Document {g}.")
            for i in range(spec.per_group):
                sessions.append(Session(
                    session_id=f"d{g}-q{i}", api=use_api, system=system, context=document,
                    turns=(Turn(make_text(rng, spec.question_tokens, count, lead=f"Question {i}."),
                                spec.output_tokens),),
                    prefix_group=f"d{g}", shared_tokens=spec.system_tokens + spec.context_tokens))
    elif name == "no-reuse":
        for g in range(spec.groups):
            for i in range(spec.per_group):
                # A unique lead makes the very first tokens differ, so no chunk is ever shared.
                lead = f"{rng.getrandbits(64):016x} {g}-{i}"
                sessions.append(Session(
                    session_id=f"n{g}-{i}", api=use_api, system="", context="",
                    turns=(Turn(make_text(rng, spec.question_tokens, count, lead=lead),
                                spec.output_tokens),),
                    prefix_group="", shared_tokens=0))
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)}")
    rng.shuffle(sessions)
    return Workload(name=name, sessions=tuple(sessions), spec=spec)


def render_request(session: Session, turn_index: int, answers: Sequence[str], *,
                   model: str) -> dict[str, object]:
    """The OpenAI request body of one turn; ``answers`` are the real replies of earlier turns.

    With ``carry_history`` the conversation so far (questions and the engine's actual answers)
    precedes the new question, as a chat client would send it.
    """
    turn = session.turns[turn_index]
    parts: list[tuple[str, str]] = []
    if session.system:
        parts.append(("system", session.system))
    first_user = f"{session.context}\n\n{session.turns[0].user}" if session.context else session.turns[0].user
    if session.carry_history:
        if len(answers) < turn_index:
            raise ValueError("a history-carrying turn needs the answers of all earlier turns")
        for i in range(turn_index):
            parts.append(("user", first_user if i == 0 else session.turns[i].user))
            parts.append(("assistant", answers[i]))
        parts.append(("user", first_user if turn_index == 0 else turn.user))
    else:
        parts.append(("user", f"{session.context}\n\n{turn.user}" if session.context else turn.user))
    body: dict[str, object] = {"model": model, "max_tokens": turn.max_tokens, "temperature": 0.0}
    if session.api == "chat":
        body["messages"] = [{"role": role, "content": text} for role, text in parts]
    else:
        body["prompt"] = "\n\n".join(text for _, text in parts)
    return body


def distinct_prefix_tokens(spec: WorkloadSpec) -> int:
    """Tokens of the distinct reusable prefixes (what a cache must hold to serve every reuse).

    Each shared prefix counts once; a history-carrying user adds their final conversation
    (each turn reuses all of it); the no-reuse control has none.
    """
    per_turn = spec.question_tokens + spec.output_tokens
    if spec.name == "shared-prefix":
        return spec.groups * spec.system_tokens
    if spec.name == "hot-prompt":
        return spec.system_tokens
    if spec.name == "multi-turn":
        users = spec.groups * spec.per_group
        return spec.system_tokens + users * (spec.context_tokens + (spec.rounds - 1) * per_turn)
    if spec.name == "long-doc":
        return spec.system_tokens + spec.groups * spec.context_tokens
    return 0


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Offsets in seconds of ``n`` arrivals of a Poisson process of ``rate`` per second."""
    if rate <= 0 or math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"arrivals:{seed}")
    t = 0.0
    out: list[float] = []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out
