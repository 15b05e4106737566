"""`sr1 rollout`: search-augmented trajectories as JSON lines, with the mask visible (--show)."""

from __future__ import annotations

from typing import Any

import typer
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sr1.cli.common import (
    CONFIG_HELP,
    JSON_HELP,
    SET_HELP,
    err_console,
    out_console,
    print_json,
    rich_progress,
)
from sr1.config import check_flag, resolve_config

# How each kind of span is drawn by --show (kinds: sr1.rollout.loop segments).
STYLES = {
    "prompt": "dim",
    "gen": "bold green",
    "obs": "black on yellow",
    "notice": "white on red",
    "force": "white on magenta",
}
LEGEND = {
    "prompt": "prompt",
    "gen": "sampled (mask 1)",
    "obs": "retrieved (mask 0)",
    "notice": "invalid notice (mask 0)",
    "force": "forced answer (mask 0)",
}


def render_trajectory(traj: Any, tokenizer: Any) -> Text:
    """The prompt and each response segment decoded from its own ids, styled by kind."""
    from sr1.rollout.loop import _mask_segments

    text = Text()
    text.append(traj.prompt, style=STYLES["prompt"])
    for kind, a, b in traj.segments or _mask_segments(traj.loss_mask):
        ids = traj.response_ids[a:b]
        text.append(tokenizer.decode(ids, skip_special_tokens=False), style=STYLES[kind])
    return text


def _legend() -> Text:
    t = Text()
    for kind, label in LEGEND.items():
        t.append(f" {label} ", style=STYLES[kind])
        t.append(" ")
    return t


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="rollout", show_header=False)
    for k, v in summary.items():
        table.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    return table


def rollout_cmd(
    model: str = typer.Option(..., "--model", help="Model alias, hub id or path."),
    index: str = typer.Option(
        ..., "--index", help="Index name (sr1 index list) or an http(s) /retrieve URL."
    ),
    dataset: str = typer.Option(
        None, "--dataset", help="Prepared dataset name (nq, hotpotqa, ...)."
    ),
    data: str = typer.Option(None, "--data", help="FlashRAG-format JSONL file of questions."),
    split: str = typer.Option("test", "--split", help="Split of --dataset."),
    limit: int = typer.Option(None, "--limit", help="Only the first N questions."),
    engine: str = typer.Option(None, "--engine", help="hf (CPU default) or vllm."),
    max_turns: int = typer.Option(
        None, "--max-turns", help="Searches allowed per trajectory (default 2)."
    ),
    topk: int = typer.Option(None, "--topk", help="Passages per search (default 3)."),
    method: str = typer.Option(
        "search", "--method", help="Prompt method for render_prompt (search: the paper's)."
    ),
    template: str = typer.Option(
        None, "--template", help="base or instruct (default: data.template)."
    ),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding instead of sampling."),
    out: str = typer.Option(None, "--out", help="Write the trajectories here as JSON lines."),
    show: bool = typer.Option(
        False, "--show", help="Render the first trajectory with its masked spans coloured."
    ),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Roll out a model with the search loop and write one JSON line per trajectory.

    Each line has id, question, golden_answers, prompt, text, prompt_ids, response_ids, loss_mask (1 = sampled by the policy, 0 = inserted by the environment), logprobs, segments (kind, start, end: gen, obs, notice, force), num_searches, queries, retrieved_ids, answer, reward, metrics, finish_reason and timings.
    """
    from sr1 import models
    from sr1.rollout.api import rollout

    check_flag("--limit", limit)
    cfg = resolve_config(
        config,
        set_,
        model={"name": model},
        rollout={"engine": engine, "max_turns": max_turns, "topk": topk},
    )
    res = rollout(
        cfg,
        index,
        dataset=dataset,
        data_file=data,
        split=split,
        limit=limit,
        out=out,
        method=method,
        template=template,
        greedy=greedy,
        progress=None if json_out else rich_progress,
    )
    trajs = res["trajectories"]
    if show and trajs:
        tok = models.load_tokenizer(cfg.model.name, cfg.model.revision)
        t = trajs[0]
        err_console.print(
            Panel(
                render_trajectory(t, tok),
                title=f"{t.id}: {t.finish_reason}, answer={t.answer!r}, reward={t.reward}",
            )
        )
        err_console.print(_legend())
    if json_out:
        doc: dict[str, Any] = {"out": out, "summary": res["summary"]}
        if not out:
            doc["trajectories"] = [t.to_dict() for t in trajs]
        print_json(doc)
        return
    out_console.print(_summary_table(res["summary"]))
    if out:
        err_console.print(f"wrote {len(trajs)} trajectories to {out}")


def register(app: typer.Typer) -> None:
    app.command("rollout")(rollout_cmd)
