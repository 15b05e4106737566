"""Search-R1 parity of the text the model sees: `sr1 search --json`'s ``observation`` and the
rollout's inserted block, byte for byte against Search-R1's own formatting code, restated.

Real pieces: the bm25s index built by `sr1 index build` from a JSONL corpus, the CLI app, the
real Qwen2.5 tokenizer and the rollout loop (driven by the scripted engine of tests/rollout).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sr1.cli.main import app
from sr1.config import RolloutConfig
from sr1.models import load_tokenizer
from sr1.retrieval.base import Passage, format_passages
from sr1.rollout.loop import run_rollouts
from tests.rollout.helpers import ScriptedEngine

CORPUS = [
    {
        "id": "1",
        "contents": '"Parable of the Prodigal Son"\nA father had two sons; the younger ran.',
    },
    {"id": "2", "contents": '"Bruce "The Boss" Springsteen"\nSpringsteen sang about the Boss ran.'},
    {"id": "3", "contents": "Zebras without a title line ran across the plain"},
    {"id": "4", "contents": '"Two lines"\nfirst line of text\nsecond line of text ran'},
]


def search_r1_observation(documents: list[dict]) -> str:
    """Search-R1 ``generation.py``: ``_passages2string`` over the server's documents, then
    ``execute_predictions``' ``f'\\n\\n<information>{result.strip()}</information>\\n\\n'``."""
    format_reference = ""
    for idx, doc_item in enumerate(documents):
        content = doc_item["contents"]
        title = content.split("\n")[0]
        text = "\n".join(content.split("\n")[1:])
        format_reference += f"Doc {idx + 1}(Title: {title}) {text}\n"
    return f"\n\n<information>{format_reference.strip()}</information>\n\n"


def _body(obs: str) -> str:
    return obs[len("\n\n<information>") : -len("</information>\n\n")]


@pytest.fixture()
def index(tmp_path: Path) -> str:
    corpus = tmp_path / "parity.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in CORPUS), encoding="utf-8")
    res = CliRunner().invoke(
        app, ["index", "build", "parity", "--corpus-file", str(corpus), "--json"]
    )
    assert res.exit_code == 0, res.output
    return "parity"


def test_search_json_observation_is_search_r1s_text(index: str) -> None:
    res = CliRunner().invoke(
        app, ["search", "ran", "Boss", "zebras", "--index", index, "-k", "4", "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    for r in doc["results"]:
        docs = [{"contents": p["contents"]} for p in r["passages"]]
        assert r["observation"] == _body(search_r1_observation(docs))
    text = doc["results"][0]["observation"]
    # the title line exactly as stored: quotes kept, inner quotes kept
    assert '(Title: "Parable of the Prodigal Son") A father' in text
    assert '(Title: "Bruce "The Boss" Springsteen") Springsteen' in text
    # a passage without a newline is all title and an empty text, as Search-R1 splits it
    assert "(Title: Zebras without a title line ran across the plain) \nDoc" in text
    assert not text.endswith("\n") and not text.startswith(" ")  # stripped like Search-R1


def test_empty_result_is_an_empty_block() -> None:
    assert format_passages([]) == ""
    assert search_r1_observation([]) == "\n\n<information></information>\n\n"


class _FixedRetriever:
    """A retriever returning fixed passages (fake: to give the empty and odd results the
    real index never returns, e.g. a remote server's ``[]``)."""

    def __init__(self, results: list[list[Passage]]) -> None:
        self.results = results

    def search(self, queries, k=3):  # noqa: ANN001, ANN201
        return [self.results[i % len(self.results)] for i in range(len(queries))]

    def describe(self) -> dict:
        return {"kind": "fixed"}


@pytest.mark.parametrize("tail", ["\n\n", ""])
@pytest.mark.parametrize("which", [0, 1])
def test_rollout_inserts_search_r1s_block_byte_for_byte(tiny_qwen2: str, tail: str, which: int):
    tok = load_tokenizer(tiny_qwen2)
    passages = [Passage(r["id"], r["contents"]) for r in CORPUS]
    results = [passages, []]
    turn1 = f"<think> look it up </think>\n<search> prodigal son </search>{tail}"
    turn2 = "<think> ok </think>\n<answer> x </answer>"
    row = {"id": "q", "question": "q?", "golden_answers": ["x"], "prompt": "Question: q?\n"}
    eng = ScriptedEngine(tok, [tok(row["prompt"])["input_ids"]], [[turn1, turn2]])
    cfg = RolloutConfig(max_turns=1, topk=4, max_obs_length=500)
    (t,) = run_rollouts(eng, _FixedRetriever([results[which]]), [row], cfg, progress=False)
    want = search_r1_observation([{"contents": p.contents} for p in results[which]])
    # Search-R1's response text is cut right after </search>, then the observation follows
    head = turn1[: turn1.index("</search>") + len("</search>")]
    assert t.text == head + want + turn2
    assert t.metrics["well_formed"] == 1.0
