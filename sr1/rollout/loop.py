"""The batched multi-turn rollout over a tool environment, building ids and the loss mask together.

The loop is tool-agnostic: an :class:`~sr1.envs.base.Env` (search by default; passing a
Retriever means ``SearchEnv(retriever, cfg.topk)``) owns the stop strings, the action parser,
the batched ``execute``, the observation rendering and the invalid-action notice. Per turn,
every active trajectory generates until the tool's closing tag, ``</answer>`` or EOS. All
actions of the turn go to ``env.execute`` in one batched call; each gets its observation
appended (for search, Search-R1's ``\\n\\n<information>Doc 1(Title: "…") …</information>\\n\\n``),
an invalid turn gets the environment's notice. ``TrajectoryState.append`` is the only way tokens enter a trajectory: sampled
tokens with mask 1 and their engine log-probs, inserted tokens with mask 0 and log-prob 0,
each run recorded as a segment (gen / obs / notice / force). Nothing is ever re-tokenised:
``response_ids`` is exactly the sequence the model saw, and ``text`` is its decode.

Stop strings ending mid-token: Qwen2.5 samples `` </search>\\n\\n`` as ``Ġ</``, ``search``,
``>ĊĊ``. The token that completes the stop string is kept whole (mask 1), newlines
included; the observation is then appended as separate tokens. Its leading ``\\n\\n`` is
shortened by the newlines the model already wrote, so the text always reads
``</search>\\n\\n<information>`` as in Search-R1, whichever way the tokens fell.

Scoring: ``sr1.tasks.task_for(data_source).score`` over the finished text (one scorer for
rewards and eval).

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
from sr1.envs.base import ANSWER_STOP, INVALID_NOTICE, Env, Observation, encode
from sr1.envs.search import SearchEnv
from sr1.errors import Sr1Error
from sr1.progress import ProgressFactory, resolve
from sr1.retrieval.base import Passage, Retriever, format_passages
from sr1.rollout.types import Trajectory
from sr1.tasks import ScoreOptions, task_for

__all__ = [
    "INVALID_NOTICE",
    "TrajectoryState",
    "observation_ids",
    "parse_query",
    "policy_text",
    "run_rollouts",
    "score_trajectory",
]

SEARCH_STOPS = ["</search>", ANSWER_STOP]
ANSWER_STOPS = [ANSWER_STOP]
# Segment kinds: what the policy samples (mask 1) and what the environment inserts (mask 0).
GEN, OBS, NOTICE, FORCE = "gen", "obs", "notice", "force"
# Spans scored as the model's answer text: never observations or notices (the notice itself
# contains "<answer> and </answer>"); the forced suffix is kept, as it opens the answer.
SCORED_KINDS = frozenset({GEN, FORCE})


def parse_query(turn_text: str) -> str | None:
    """The query between the last ``</search>`` of this turn and the ``<search>`` before it
    (stripped); None when there is no such pair or the query is empty."""
    action = _PARSER.parse(turn_text)
    return action.content if action is not None else None


class TrajectoryState:
    """A trajectory under construction; ``append`` is the only way tokens get in (rollouts and
    SFT's gold trajectories alike)."""

    def __init__(self, traj: Trajectory, seed: int = 0) -> None:
        self.t = traj
        self.done = False
        self.forced = False
        self.seed = int(seed)  # this trajectory's sampling seed (turn t uses seed + 100_003 t)

    def append(
        self, ids: Sequence[int], kind: str, logprobs: Sequence[float] | None = None
    ) -> None:
        """Append ``ids`` as one segment: ``gen`` tokens get mask 1 and need one log-prob
        each; every other kind is environment text (mask 0, log-prob 0)."""
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

    def observe(self, env: Env, obs: Observation) -> None:
        """Record what a tool call returned (queries, retrieved ids) on the trajectory."""
        t = self.t
        t.num_searches += 1
        t.queries.append(str(obs.info.get("query", "")))
        t.retrieved_ids.append(list(obs.info.get("ids", [])))

    def context(self) -> list[int]:
        return self.t.prompt_ids + self.t.response_ids

    def finish(self, reason: str) -> None:
        self.done, self.t.finish_reason = True, reason


_PARSER = SearchEnv(None)  # parsing and rendering need no retriever


def _encode(tokenizer: Any, text: str) -> list[int]:
    return encode(tokenizer, text)


def observation_ids(
    tokenizer: Any, passages: Sequence[Passage], max_obs_length: int, after: str
) -> list[int]:
    """Token ids of the search observation for ``passages`` inserted after the text ``after``
    (Search-R1's block; see :meth:`sr1.envs.base.Env.observation_ids`)."""
    obs = Observation(text=format_passages(passages))
    return _PARSER.observation_ids(tokenizer, obs, max_obs_length, after)


def as_env(env: Env | Retriever | None, cfg: RolloutConfig) -> Env | None:
    """An Env for the rollout: a Retriever becomes ``SearchEnv(retriever, cfg.topk)``."""
    if env is None or isinstance(env, Env):
        return env
    return SearchEnv(env, topk=cfg.topk)


def run_rollouts(
    engine: Any,
    env: Env | Retriever | None,
    rows: Sequence[dict[str, Any]],
    cfg: RolloutConfig,
    n_samples: int = 1,
    greedy: bool = False,
    reward_fn: Callable[[Trajectory], float] | None = None,
    progress: ProgressFactory | bool | None = None,
    seed: int | None = None,
    scoring: ScoreOptions | None = None,
    default_task: str = "qa",
) -> list[Trajectory]:
    """Roll out ``n_samples`` trajectories per row (rows: id, question, golden_answers,
    data_source, prompt — the rendered prompt text, tokenised once here) in ``env``
    (a Retriever means search; None or ``cfg.max_turns == 0``: one turn, no tool).

    Returns them grouped by row, in row order (``Trajectory.group`` = row index). Metrics come
    from the task of each row's ``data_source`` (``sr1.tasks``, options ``scoring``); rewards
    from ``reward_fn(traj)`` when given, else EM.
    """
    tok = engine.tokenizer
    environment = as_env(env, cfg)
    opts = scoring if scoring is not None else ScoreOptions()
    if not opts.special_tokens:
        opts = ScoreOptions(opts.nfkc, opts.answer_fallback, _special_tokens(tok))
    states: list[TrajectoryState] = []
    base_seed = cfg.seed if seed is None else seed
    for gi, row in enumerate(rows):
        pids = _encode(tok, row["prompt"])
        prompt = row["prompt"]
        if len(pids) > cfg.max_prompt_length:  # keep the record honest: store what was used
            pids = pids[-cfg.max_prompt_length :]
            prompt = tok.decode(pids, skip_special_tokens=False)
        for _ in range(n_samples):
            states.append(
                TrajectoryState(
                    Trajectory(
                        id=str(row["id"]),
                        question=row["question"],
                        golden_answers=list(row["golden_answers"]),
                        data_source=row.get("data_source", ""),
                        prompt=prompt,
                        prompt_ids=list(pids),
                        group=gi,
                        hops=_hops(row),
                    ),
                    seed=base_seed + len(states),
                )
            )
    bs = max(1, cfg.batch_size) * max(1, n_samples)
    temperature = 0.0 if greedy else cfg.temperature
    with resolve(progress)("rollout", len(states)) as advance:
        for start in range(0, len(states), bs):
            chunk = states[start : start + bs]
            _rollout_chunk(engine, environment, chunk, cfg, temperature)
            for s in chunk:
                finalize(s, tok, reward_fn, opts, default_task)
            advance(len(chunk))
    clear = getattr(engine, "clear_cache", None)
    if callable(clear):  # KV kept across turns is useless once the trajectories are done
        clear()
    return [s.t for s in states]


def _hops(row: dict[str, Any]) -> int:
    """A row's hop count from its ``metadata`` (the synthetic world's), 0 when unknown."""
    meta = row.get("metadata")
    try:
        return int(meta.get("hops") or 0) if isinstance(meta, dict) else 0
    except (TypeError, ValueError):
        return 0


def _special_tokens(tok: Any) -> tuple[str, ...]:
    return tuple(getattr(tok, "all_special_tokens", None) or ())


def _room(s: TrajectoryState, cfg: RolloutConfig, max_context: int) -> int:
    """Tokens this trajectory may still add (response budget and context limit)."""
    return min(
        cfg.max_total_response_length - len(s.t.response_ids), max_context - len(s.context())
    )


def _out_of_room_reason(s: TrajectoryState, cfg: RolloutConfig) -> str:
    return "length" if len(s.t.response_ids) >= cfg.max_total_response_length else "context"


def _insert(
    s: TrajectoryState, ids: list[int], kind: str, cfg: RolloutConfig, max_context: int
) -> bool:
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
    active: list[TrajectoryState],
    cfg: RolloutConfig,
    stop: list[str],
    temperature: float,
    turn: int,
) -> list[tuple[TrajectoryState, Any]]:
    """One generate call for the trajectories with room left; sampled tokens are appended
    (mask 1) and the generation time is shared out. Returns (state, GenOutput) pairs.

    Each trajectory samples with its own seed for this ``turn`` (its seed + 100_003 * turn),
    so what it samples does not depend on which others share the call: the same
    trajectories come out whatever the batch size or the number of data-parallel ranks."""
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
        seed=[s.seed + 100_003 * turn for s in live],
    )
    dt = time.perf_counter() - t0
    if len(outs) != len(live):
        raise Sr1Error(f"engine returned {len(outs)} outputs for {len(live)} prompts")
    # the policy version that sampled these tokens (a remote engine reports the server's);
    # a trajectory whose turns saw different versions keeps the oldest
    version = int(getattr(engine, "version", 0))
    for s, o, b in zip(live, outs, budgets, strict=True):
        if len(o.token_ids) > b:
            raise Sr1Error(f"engine generated {len(o.token_ids)} tokens, over the budget of {b}")
        first = not any(k == GEN for k, _, _ in s.t.segments)
        s.t.policy_version = version if first else min(s.t.policy_version, version)
        s.t.gen_time_s += dt / len(live)
        s.append(o.token_ids, GEN, o.logprobs)
    return list(zip(live, outs, strict=True))


def _rollout_chunk(
    engine: Any,
    env: Env | None,
    chunk: list[TrajectoryState],
    cfg: RolloutConfig,
    temperature: float,
) -> None:
    tok = engine.tokenizer
    tool = env if env is not None and cfg.max_turns > 0 else None
    n_turns = cfg.max_turns + 1 if tool is not None else 1
    stops = tool.stops if tool is not None else ANSWER_STOPS
    to_force: list[TrajectoryState] = []
    for turn in range(n_turns):
        final = turn == n_turns - 1
        active = [s for s in chunk if not s.done]
        if not active:
            break
        calls: list[tuple[TrajectoryState, Any]] = []
        for s, o in _generate(engine, active, cfg, stops, temperature, turn):
            turn_text = tok.decode(o.token_ids, skip_special_tokens=False)
            action = tool.parse(turn_text) if tool is not None and o.stop_str == tool.stop else None
            if o.finish_reason == "eos":
                s.finish("answer" if ANSWER_STOP in turn_text else "eos")
            elif o.stop_str == ANSWER_STOP:
                s.finish("answer")
            elif _room(s, cfg, engine.max_context) <= 0:
                s.finish(_out_of_room_reason(s, cfg))
            elif final:
                if tool is not None and cfg.force_answer:
                    to_force.append(s)
                else:
                    s.finish("max_turns" if action is not None else "length")
            elif action is not None:
                calls.append((s, action))
            else:  # no valid action this turn: the environment's notice (inserted, mask 0)
                assert tool is not None
                notice = _encode(tok, tool.invalid_notice)
                _insert(s, notice, NOTICE, cfg, engine.max_context)
        if calls:
            assert tool is not None
            _execute(tok, tool, calls, cfg, engine.max_context)
    if to_force:
        _force_answers(engine, to_force, cfg, temperature, n_turns)
    for s in chunk:
        if not s.done:  # cannot happen with a well-behaved engine; never leave one open
            s.finish("max_turns")


def _execute(
    tok: Any,
    env: Env,
    calls: list[tuple[TrajectoryState, Any]],
    cfg: RolloutConfig,
    max_context: int,
) -> None:
    """All of a turn's actions in one batched ``env.execute``; observations appended (mask 0)."""
    t0 = time.perf_counter()
    results = env.execute([a for _, a in calls])
    dt = time.perf_counter() - t0
    if len(results) != len(calls):
        raise Sr1Error(f"environment returned {len(results)} observations for {len(calls)}")
    for (s, _), obs in zip(calls, results, strict=True):
        s.t.retrieval_time_s += dt / len(calls)
        s.observe(env, obs)
        after = tok.decode(s.t.response_ids[-4:], skip_special_tokens=False)
        _insert(s, env.observation_ids(tok, obs, cfg.max_obs_length, after), OBS, cfg, max_context)


def _force_answers(
    engine: Any, states: list[TrajectoryState], cfg: RolloutConfig, temperature: float, turn: int
) -> None:
    """Append the forced-answer suffix (mask 0) and let the model write the answer."""
    suffix = _encode(engine.tokenizer, cfg.force_answer_text)
    go = []
    for s in states:
        s.forced = True
        if _insert(s, suffix, FORCE, cfg, engine.max_context):
            go.append(s)
    for s, o in _generate(engine, go, cfg, ANSWER_STOPS, temperature, turn):
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


def score_trajectory(
    t: Trajectory,
    tok: Any,
    opts: ScoreOptions | None = None,
    default_task: str = "qa",
    docs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The task metrics of a finished trajectory (``sr1.tasks``): what rewards and eval read.
    ``docs`` overrides the retrieved texts (default: the response's information blocks)."""
    opts = opts if opts is not None else ScoreOptions(special_tokens=_special_tokens(tok))
    text = t.text or tok.decode(t.response_ids, skip_special_tokens=False)
    forced = any(k == FORCE for k, _, _ in t.segments)
    return task_for(t.data_source, default_task).score(
        text, t.golden_answers, policy_text=policy_text(t, tok), forced=forced, docs=docs, opts=opts
    )


def finalize(
    s: TrajectoryState,
    tok: Any,
    reward_fn: Callable[[Trajectory], float] | None = None,
    opts: ScoreOptions | None = None,
    default_task: str = "qa",
) -> None:
    """Decode, score (``score_trajectory``) and reward a finished trajectory."""
    t = s.t
    t.text = tok.decode(t.response_ids, skip_special_tokens=False)
    m = score_trajectory(t, tok, opts, default_task)
    t.answer = m.pop("answer")
    t.metrics = m
    t.reward = float(reward_fn(t)) if reward_fn is not None else float(m["em"])
