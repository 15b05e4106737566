"""The batched multi-turn Search-R1 rollout, building ids and the loss mask together.

Per turn, every active trajectory generates until ``</search>``, ``</answer>`` or EOS. All
queries of the turn go to the retriever in one batched call; each searching trajectory gets
``\\n\\n<information>Doc 1(Title: …) …</information>\\n\\n`` appended, an invalid turn gets
the paper's notice. ``_State.append`` is the only way tokens enter a trajectory: sampled
tokens with mask 1 and their engine log-probs, inserted tokens with mask 0 and log-prob 0,
each run recorded as a segment (gen / obs / notice / force). Nothing is ever re-tokenised:
``response_ids`` is exactly the sequence the model saw, and ``text`` is its decode.

Stop strings ending mid-token: Qwen2.5 samples `` </search>\\n\\n`` as ``Ġ</``, ``search``,
``>ĊĊ``. The token that completes the stop string is kept whole (mask 1), newlines
included; the observation is then appended as separate tokens. Its leading ``\\n\\n`` is
shortened by the newlines the model already wrote, so the text always reads
``</search>\\n\\n<information>`` as in Search-R1, whichever way the tokens fell.

Turns (Search-R1's loop): ``max_turns`` turns may search (an invalid turn uses one up too),
so at most ``max_turns`` searches run; then one final turn in which a search is not executed.
If that final turn has no answer either, ``force_answer`` appends ``force_answer_text``
(ending in ``<answer>``, mask 0) and the model writes the answer until ``</answer>``
(a departure from Search-R1, which just stops; turn it off to match). A turn that hits
``max_response_length`` without a tag is invalid. The response is capped at
``max_total_response_length`` tokens and prompt + response at the engine's context limit;
an insertion that does not fit is cut there and the trajectory ends. With no retriever or
``max_turns=0`` (eval methods direct/cot/rag) a single turn runs until ``</answer>`` or EOS.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from sr1.config import RolloutConfig
from sr1.errors import Sr1Error
from sr1.retrieval.base import Passage, Retriever, format_passages
from sr1.rollout.types import Trajectory
from sr1.scoring import answer_in_text, score

INVALID_NOTICE = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n"
)
SEARCH_STOPS = ["</search>", "</answer>"]
ANSWER_STOPS = ["</answer>"]
# Segment kinds: what the policy samples (mask 1) and what the environment inserts (mask 0).
GEN, OBS, NOTICE, FORCE = "gen", "obs", "notice", "force"
# Spans scored as the model's answer text: never observations or notices (the notice itself
# contains "<answer> and </answer>"); the forced suffix is kept, as it opens the answer.
SCORED_KINDS = frozenset({GEN, FORCE})


def parse_query(turn_text: str) -> str | None:
    """The query between the last ``</search>`` of this turn and the ``<search>`` before it
    (stripped); None when there is no such pair or the query is empty."""
    end = turn_text.rfind("</search>")
    start = turn_text.rfind("<search>", 0, max(end, 0))
    if end < 0 or start < 0:
        return None
    return turn_text[start + len("<search>") : end].strip() or None


class _State:
    """A trajectory under construction; ``append`` is the only way tokens get in."""

    def __init__(self, traj: Trajectory) -> None:
        self.t = traj
        self.done = False
        self.passages: list[Passage] = []
        self.forced = False

    def append(
        self, ids: Sequence[int], kind: str, logprobs: Sequence[float] | None = None
    ) -> None:
        if not ids:
            return
        t = self.t
        start = len(t.response_ids)
        t.response_ids.extend(int(i) for i in ids)
        if kind == GEN:
            if logprobs is None or len(logprobs) != len(ids):
                raise ValueError("sampled tokens need one log-prob each")
            t.loss_mask.extend([1] * len(ids))
            t.logprobs.extend(float(x) for x in logprobs)
        else:
            t.loss_mask.extend([0] * len(ids))
            t.logprobs.extend([0.0] * len(ids))
        t.segments.append((kind, start, len(t.response_ids)))

    def context(self) -> list[int]:
        return self.t.prompt_ids + self.t.response_ids

    def finish(self, reason: str) -> None:
        self.done, self.t.finish_reason = True, reason


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def observation_ids(
    tokenizer: Any, passages: Sequence[Passage], max_obs_length: int, after: str
) -> list[int]:
    """Token ids of the information block inserted after the text ``after``.

    The passages are cut to ``max_obs_length`` tokens while the opening and closing tags are
    always kept; the leading ``\\n\\n`` is shortened by the newlines ``after`` ends with.
    """
    newlines = len(after) - len(after.rstrip("\n"))
    lead = "\n" * max(0, 2 - newlines) + "<information>"
    body = _encode(tokenizer, format_passages(passages))[:max_obs_length]
    return _encode(tokenizer, lead) + body + _encode(tokenizer, "</information>\n\n")


def run_rollouts(
    engine: Any,
    retriever: Retriever | None,
    rows: Sequence[dict[str, Any]],
    cfg: RolloutConfig,
    n_samples: int = 1,
    greedy: bool = False,
    reward_fn: Callable[[Trajectory], float] | None = None,
    progress: bool = True,
    seed: int | None = None,
) -> list[Trajectory]:
    """Roll out ``n_samples`` trajectories per row (rows: id, question, golden_answers,
    data_source, prompt — the rendered prompt text, tokenised once here).

    Returns them grouped by row, in row order (``Trajectory.group`` = row index). Rewards
    come from ``reward_fn(traj)`` when given, else EM (``sr1.scoring``).
    """
    tok = engine.tokenizer
    states: list[_State] = []
    for gi, row in enumerate(rows):
        pids = _encode(tok, row["prompt"])
        prompt = row["prompt"]
        if len(pids) > cfg.max_prompt_length:  # keep the record honest: store what was used
            pids = pids[-cfg.max_prompt_length :]
            prompt = tok.decode(pids, skip_special_tokens=False)
        for _ in range(n_samples):
            states.append(
                _State(
                    Trajectory(
                        id=str(row["id"]),
                        question=row["question"],
                        golden_answers=list(row["golden_answers"]),
                        data_source=row.get("data_source", ""),
                        prompt=prompt,
                        prompt_ids=list(pids),
                        group=gi,
                    )
                )
            )
    bs = max(1, cfg.batch_size) * max(1, n_samples)
    temperature = 0.0 if greedy else cfg.temperature
    base_seed = cfg.seed if seed is None else seed
    with _progress(progress, len(states)) as advance:
        for start in range(0, len(states), bs):
            chunk = states[start : start + bs]
            _rollout_chunk(engine, retriever, chunk, cfg, temperature, base_seed + start)
            for s in chunk:
                _finalize(s, tok, reward_fn)
            advance(len(chunk))
    return [s.t for s in states]


class _progress:
    """A rich progress bar on stderr (or nothing), used as ``with _progress(on, n) as advance``."""

    def __init__(self, on: bool, total: int) -> None:
        self.bar = None
        if on:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            from sr1.cli.common import err_console

            self.bar = Progress(
                "rollout",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err_console,
                transient=True,
            )
            self.task = self.bar.add_task("rollout", total=total)

    def __enter__(self) -> Callable[[int], None]:
        if self.bar is None:
            return lambda n: None
        self.bar.start()
        return lambda n: self.bar.update(self.task, advance=n)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _room(s: _State, cfg: RolloutConfig, max_context: int) -> int:
    """Tokens this trajectory may still add (response budget and context limit)."""
    return min(
        cfg.max_total_response_length - len(s.t.response_ids), max_context - len(s.context())
    )


def _out_of_room_reason(s: _State, cfg: RolloutConfig) -> str:
    return "length" if len(s.t.response_ids) >= cfg.max_total_response_length else "context"


def _insert(s: _State, ids: list[int], kind: str, cfg: RolloutConfig, max_context: int) -> bool:
    """Append environment tokens (mask 0); if they do not fit, append what fits and end the
    trajectory. Returns whether the trajectory can go on."""
    room = _room(s, cfg, max_context)
    if len(ids) >= room:
        s.append(ids[: max(room, 0)], kind)
        s.finish(_out_of_room_reason(s, cfg))
        return False
    s.append(ids, kind)
    return True


def _generate(
    engine: Any,
    active: list[_State],
    cfg: RolloutConfig,
    stop: list[str],
    temperature: float,
    seed: int,
) -> list[tuple[_State, Any]]:
    """One generate call for the trajectories with room left; sampled tokens are appended
    (mask 1) and the generation time is shared out. Returns (state, GenOutput) pairs."""
    budgets = []
    live = []
    for s in active:
        b = min(cfg.max_response_length, _room(s, cfg, engine.max_context))
        if b <= 0:
            s.finish(_out_of_room_reason(s, cfg))
        else:
            live.append(s)
            budgets.append(b)
    if not live:
        return []
    t0 = time.perf_counter()
    outs = engine.generate(
        [s.context() for s in live],
        max_new_tokens=budgets,
        stop=stop,
        temperature=temperature,
        top_p=cfg.top_p,
        seed=seed,
    )
    dt = time.perf_counter() - t0
    if len(outs) != len(live):
        raise Sr1Error(f"engine returned {len(outs)} outputs for {len(live)} prompts")
    for s, o, b in zip(live, outs, budgets, strict=True):
        if len(o.token_ids) > b:
            raise Sr1Error(f"engine generated {len(o.token_ids)} tokens, over the budget of {b}")
        s.t.gen_time_s += dt / len(live)
        s.append(o.token_ids, GEN, o.logprobs)
    return list(zip(live, outs, strict=True))


def _rollout_chunk(
    engine: Any,
    retriever: Retriever | None,
    chunk: list[_State],
    cfg: RolloutConfig,
    temperature: float,
    seed: int,
) -> None:
    tok = engine.tokenizer
    can_search = retriever is not None and cfg.max_turns > 0
    n_turns = cfg.max_turns + 1 if can_search else 1
    stops = SEARCH_STOPS if can_search else ANSWER_STOPS
    to_force: list[_State] = []
    for turn in range(n_turns):
        final = turn == n_turns - 1
        active = [s for s in chunk if not s.done]
        if not active:
            break
        searches: list[tuple[_State, str]] = []
        turn_seed = seed + 100_003 * turn  # engines add the row index to it
        for s, o in _generate(engine, active, cfg, stops, temperature, turn_seed):
            turn_text = tok.decode(o.token_ids, skip_special_tokens=False)
            query = parse_query(turn_text) if o.stop_str == "</search>" else None
            if o.finish_reason == "eos":
                s.finish("answer" if "</answer>" in turn_text else "eos")
            elif o.stop_str == "</answer>":
                s.finish("answer")
            elif _room(s, cfg, engine.max_context) <= 0:
                s.finish(_out_of_room_reason(s, cfg))
            elif final:
                if can_search and cfg.force_answer:
                    to_force.append(s)
                else:
                    s.finish("max_turns" if query is not None else "length")
            elif query is not None:
                searches.append((s, query))
            else:  # no valid action this turn: the paper's notice (inserted, mask 0)
                _insert(s, _encode(tok, INVALID_NOTICE), NOTICE, cfg, engine.max_context)
        if searches:
            assert retriever is not None
            _search(tok, retriever, searches, cfg, engine.max_context)
    if to_force:
        _force_answers(engine, to_force, cfg, temperature, seed + 100_003 * n_turns)
    for s in chunk:
        if not s.done:  # cannot happen with a well-behaved engine; never leave one open
            s.finish("max_turns")


def _search(
    tok: Any,
    retriever: Retriever,
    searches: list[tuple[_State, str]],
    cfg: RolloutConfig,
    max_context: int,
) -> None:
    """All of a turn's queries in one batched retriever call; observations appended (mask 0)."""
    t0 = time.perf_counter()
    results = retriever.search([q for _, q in searches], k=cfg.topk)
    dt = time.perf_counter() - t0
    if len(results) != len(searches):
        raise Sr1Error(f"retriever returned {len(results)} results for {len(searches)} queries")
    for (s, q), passages in zip(searches, results, strict=True):
        s.t.retrieval_time_s += dt / len(searches)
        s.t.num_searches += 1
        s.t.queries.append(q)
        s.t.retrieved_ids.append([p.id for p in passages])
        s.passages.extend(passages)
        after = tok.decode(s.t.response_ids[-4:], skip_special_tokens=False)
        obs = observation_ids(tok, passages, cfg.max_obs_length, after)
        _insert(s, obs, OBS, cfg, max_context)


def _force_answers(
    engine: Any, states: list[_State], cfg: RolloutConfig, temperature: float, seed: int
) -> None:
    """Append the forced-answer suffix (mask 0) and let the model write the answer."""
    suffix = _encode(engine.tokenizer, cfg.force_answer_text)
    go = []
    for s in states:
        s.forced = True
        if _insert(s, suffix, FORCE, cfg, engine.max_context):
            go.append(s)
    for s, o in _generate(engine, go, cfg, ANSWER_STOPS, temperature, seed):
        out_of_room = o.finish_reason == "length" and _room(s, cfg, engine.max_context) <= 0
        s.finish(_out_of_room_reason(s, cfg) if out_of_room else "forced")


def policy_text(t: Trajectory, tok: Any) -> str:
    """The text scored as the model's response: sampled spans and the forced-answer suffix,
    never information blocks or notices. Runs separated by a dropped span are joined by a
    newline. Trajectories without segments (built elsewhere) use the mask: sampled spans."""
    segments = t.segments or _mask_segments(t.loss_mask)
    runs: list[list[int]] = [[]]
    for kind, a, b in segments:
        if kind in SCORED_KINDS:
            runs[-1].extend(t.response_ids[a:b])
        elif runs[-1]:
            runs.append([])
    return "\n".join(tok.decode(r, skip_special_tokens=False) for r in runs if r)


def _mask_segments(mask: Sequence[int]) -> list[tuple[str, int, int]]:
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((GEN if mask[start] else OBS, start, i))
            start = i
    return out


def _finalize(s: _State, tok: Any, reward_fn: Callable[[Trajectory], float] | None) -> None:
    t = s.t
    t.text = tok.decode(t.response_ids, skip_special_tokens=False)
    m: dict[str, Any] = dict(score(policy_text(t, tok), t.golden_answers))
    t.answer = m.pop("answer")
    if s.forced:  # the environment opened the answer: not the policy's own format
        m["well_formed"] = 0.0
    m["forced_answer"] = float(s.forced)
    docs = "\n".join(p.contents for p in s.passages)
    m["answer_in_docs"] = answer_in_text(docs, t.golden_answers) if s.passages else 0.0
    t.metrics = m
    t.reward = float(reward_fn(t)) if reward_fn is not None else float(m["em"])
