"""End-to-end evals on real sample-data slices with the tiny Qwen2 (random weights, real
tokenizer): stored rows recompute to the summary, a crashed eval resumes without duplicates,
``--run`` finds a run's checkpoint, and the CLI's errors are actionable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sr1 import paths
from sr1.cli.main import app
from sr1.config import resolve_config
from sr1.errors import ConfigError, NotFoundError, Sr1Error
from sr1.eval.checkpoints import latest_checkpoint, resolve_run_checkpoint
from sr1.tasks import task_for
from sr1.tracking.store import Store

# Tiny budgets: tiny-qwen2 emits random tokens, so these tests check plumbing, not accuracy.
FAST = ["eval.max_new_tokens=6", "eval.batch_size=3", "rollout.max_prompt_length=384"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _cfg(*extra: str):
    return resolve_config(None, [*FAST, *extra])


@pytest.fixture()
def tiny_index(shared_data: Path, tmp_path: Path) -> str:
    """A real BM25 index over the first 1,500 passages of the sample corpus."""
    index_mod = pytest.importorskip("sr1.retrieval.index", reason="retrieval stage not built yet")
    src = shared_data / "corpus" / "wiki-sample.jsonl"
    part = tmp_path / "wiki-part.jsonl"
    with open(src, encoding="utf-8") as f, open(part, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i >= 1500:
                break
            out.write(line)
    index_mod.build_index("wikipart", corpus_file=part, retriever="bm25", progress=False)
    return "wikipart"


def _needs_stack() -> None:
    for mod in ("sr1.rollout.loop", "sr1.rollout.engines", "sr1.data.prepare", "sr1.data.prompts"):
        pytest.importorskip(mod, reason="rollout/data stage not built yet")


def test_rows_recompute_to_summary(tiny_qwen2: str, shared_data: Path) -> None:
    _needs_stack()
    from sr1.eval.runner import evaluate

    summary = evaluate(
        ["nq", "bamboogle"],
        model=tiny_qwen2,
        method="direct",
        source_dir=str(shared_data / "qa"),
        split="dev",
        limit=4,
        cfg=_cfg(),
        progress=False,
    )
    rid = summary["run_id"]
    store = Store()
    assert store.get_run(rid)["status"] == "finished" and store.get_run(rid)["kind"] == "eval"
    assert list(summary["datasets"]) == ["nq", "bamboogle"]
    rows = store.eval_results([rid])
    assert len(rows) == 8
    for d in ("nq", "bamboogle"):
        ds = [r for r in rows if r["dataset"] == d]
        assert len(ds) == 4 == summary["datasets"][d]["n"]
        # every stored EM is the shared scorer applied to the stored response ...
        for r in ds:
            s = task_for(d).score(r["response"], r["golden_answers"])
            assert (r["em"], r["f1"], r["prediction"]) == (s["em"], s["f1"], s["answer"])
            assert r["answer_in_docs"] is None and r["num_searches"] == 0
            assert 0 < r["response_tokens"] <= 6 and r["seconds"] > 0
        # ... and the summary is their mean
        assert summary["datasets"][d]["em"] == pytest.approx(sum(r["em"] for r in ds) / 4)
        assert summary["datasets"][d]["searches_dist"] == {"0": 4}
    sums = {s["dataset"]: s for s in store.eval_summaries([rid])}
    assert sums["nq"]["metrics"]["em"] == summary["datasets"]["nq"]["em"]
    setup = sums["bamboogle"]["setup"]
    assert setup["split"] == "dev" and setup["limit"] == 4 and setup["method"] == "direct"
    assert setup["sampling"]["greedy"] is True and setup["sampling"]["max_new_tokens"] == 6
    assert setup["model"]["resolved"] == tiny_qwen2 and setup["n_examples"] == 4
    assert (paths.runs_dir() / rid / "eval_summary.json").is_file()


def test_killed_eval_resumes_without_duplicates(tiny_qwen2: str, shared_data: Path) -> None:
    _needs_stack()
    from sr1.eval.runner import evaluate

    class Killed(Exception):
        pass

    def die_after_first_batch(dataset: str, stored: int) -> None:
        raise Killed(f"{dataset} {stored}")

    args = dict(
        datasets=["nq", "hotpotqa"],
        model=tiny_qwen2,
        method="direct",
        source_dir=str(shared_data / "qa"),
        split="dev",
        limit=5,
        cfg=_cfg(),
        progress=False,
    )
    with pytest.raises(Killed, match="nq 3"):
        evaluate(**args, on_batch=die_after_first_batch)
    store = Store()
    (run,) = store.list_runs("eval")
    assert run["status"] == "failed"
    assert len(store.eval_results([run["run_id"]])) == 3  # the first batch survived the crash

    seen: list[tuple[str, int]] = []
    summary = evaluate(**args, on_batch=lambda d, n: seen.append((d, n)))
    assert summary["run_id"] == run["run_id"] and summary["resumed"] is True
    assert summary["evaluated_now"] == 7  # 10 questions, 3 were already stored
    assert seen == [("nq", 5), ("hotpotqa", 3), ("hotpotqa", 5)]
    rows = store.eval_results([run["run_id"]])
    keys = [(r["dataset"], r["example_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == 10
    assert store.get_run(run["run_id"])["status"] == "finished"

    again = evaluate(resume=run["run_id"], progress=False)  # explicit resume: nothing left
    assert again["evaluated_now"] == 0 and again["datasets"] == summary["datasets"]
    fresh = evaluate(**args, fresh=True)
    assert fresh["run_id"] != run["run_id"] and fresh["evaluated_now"] == 10


def test_rag_and_search_record_retrieval_and_setup(
    tiny_qwen2: str, shared_data: Path, tiny_index: str
) -> None:
    _needs_stack()
    from sr1.eval.runner import evaluate

    summary = evaluate(
        ["nq"],
        model=tiny_qwen2,
        method="rag",
        index=tiny_index,
        source_dir=str(shared_data / "qa"),
        split="dev",
        limit=3,
        cfg=_cfg("retrieval.topk=2"),
        progress=False,
    )
    rows = Store().eval_results([summary["run_id"]])
    assert len(rows) == 3
    for r in rows:
        assert r["answer_in_docs"] in (0.0, 1.0) and len(r["retrieved_ids"][0]) == 2
    setup = summary["setup"]["nq"]
    assert setup["topk"] == 2 and setup["index"] == tiny_index
    assert setup["retriever"]["manifest_sha256"] and setup["retriever"]["passages"] == 1500
    m = summary["datasets"]["nq"]
    assert m["answer_in_docs"] == pytest.approx(sum(r["answer_in_docs"] for r in rows) / 3)

    # the search loop on the same index: its setup records the loop's top-k and turn budget
    s2 = evaluate(
        ["nq"],
        model=tiny_qwen2,
        method="search",
        index=tiny_index,
        source_dir=str(shared_data / "qa"),
        split="dev",
        limit=2,
        cfg=_cfg("rollout.max_turns=1", "rollout.topk=1"),
        progress=False,
    )
    st = s2["setup"]["nq"]
    assert st["topk"] == 1 and st["sampling"]["max_turns"] == 1 and st["rollout"]["topk"] == 1
    for r in Store().eval_results([s2["run_id"]]):
        assert r["num_searches"] <= 1 and r["answer_in_docs"] in (0.0, 1.0)
        assert len(r["retrieved_ids"]) == r["num_searches"]


def test_run_id_resolves_to_latest_checkpoint(tiny_qwen2: str) -> None:
    store = Store()
    store.create_run("train-x", "train", model="tiny-qwen2")
    with pytest.raises(NotFoundError, match="has no checkpoint"):
        resolve_run_checkpoint("train-x")
    with pytest.raises(NotFoundError, match="train-x"):  # unknown id lists recent runs
        resolve_run_checkpoint("train-nope")
    ck = paths.runs_dir() / "train-x" / "checkpoints"
    ck.mkdir(parents=True)
    for step in (2, 10):
        os.symlink(tiny_qwen2, ck / f"step-{step}")
    (ck / "step-11").mkdir()  # incomplete save (no config.json): ignored
    assert latest_checkpoint(paths.runs_dir() / "train-x") == ck / "step-10"
    os.symlink(tiny_qwen2, ck / "final")
    path, run = resolve_run_checkpoint("train-x")
    assert path == ck / "final" and run["kind"] == "train"


def test_eval_of_a_training_run_uses_its_checkpoint(tiny_qwen2: str, shared_data: Path) -> None:
    _needs_stack()
    from sr1.eval.runner import evaluate

    Store().create_run("train-y", "train", model="tiny-qwen2")
    ck = paths.runs_dir() / "train-y" / "checkpoints"
    ck.mkdir(parents=True)
    os.symlink(tiny_qwen2, ck / "step-3")
    summary = evaluate(
        ["musique"],
        run="train-y",
        method="direct",
        source_dir=str(shared_data / "qa"),
        split="dev",
        limit=2,
        cfg=_cfg(),
        progress=False,
    )
    assert summary["model"] == "train-y/checkpoints/step-3"
    run = Store().get_run(summary["run_id"])
    assert run["parent_run"] == "train-y" and run["model"] == "train-y/checkpoints/step-3"
    assert summary["setup"]["musique"]["from_run"] == "train-y"


def test_cli_eval_json_and_errors(tiny_qwen2: str, shared_data: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--dataset", "nq", "--all-datasets", "--model", "x"])
    assert isinstance(res.exception, Sr1Error) and "exactly one of" in str(res.exception)
    res = runner.invoke(app, ["eval", "--dataset", "nq"])
    assert "--model M or --run RUN_ID" in str(res.exception)
    res = runner.invoke(app, ["eval", "--dataset", "nq", "--run", "train-missing"])
    assert isinstance(res.exception, NotFoundError) and "unknown run id" in str(res.exception)
    res = runner.invoke(app, ["eval", "-d", "nq", "--model", tiny_qwen2, "--method", "bogus"])
    # an unknown method is a config value outside its choices: refused before any work
    assert isinstance(res.exception, ConfigError) and "direct" in str(res.exception)
    _needs_stack()
    qa = str(shared_data / "qa")
    res = runner.invoke(
        app,
        [
            "eval",
            "-d",
            "nosuchset",
            "--model",
            tiny_qwen2,
            "--method",
            "direct",
            "--source-dir",
            qa,
        ],
    )
    assert isinstance(res.exception, NotFoundError) and "bamboogle" in str(res.exception)
    argv = ["eval", "-d", "popqa", "--model", tiny_qwen2, "--method", "cot", "--source-dir", qa]
    argv += ["--split", "dev", "--limit", "2", "--json"] + [x for s in FAST for x in ("--set", s)]
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["datasets"]["popqa"]["n"] == 2 and doc["method"] == "cot"
    assert Store().get_run(doc["run_id"])["status"] == "finished"


def test_answer_fallback_scores_the_first_line_of_untagged_responses() -> None:
    from sr1.eval.methods import get_method
    from sr1.eval.runner import _example_row, fallback_answer
    from sr1.rollout.types import Trajectory
    from sr1.tasks import ScoreOptions

    specials = ["<|im_end|>"]
    assert fallback_answer("The answer is: Paris.<|im_end|>", specials) == "Paris."
    assert fallback_answer("\n  Answerable question\nmore", specials) == "Answerable question"
    assert fallback_answer("<|im_end|>", specials) is None
    row = {"id": "q1", "question": "Capital of France?", "golden_answers": ["Paris"]}
    t = Trajectory(
        id="q1", question=row["question"], golden_answers=["Paris"], data_source="nq",
        prompt="", prompt_ids=[], text="Answer: Paris<|im_end|>",
    )  # fmt: skip
    qa = task_for("nq")

    def row_for(text: str, fallback: str) -> dict:
        m = qa.score(
            text,
            ["Paris"],
            opts=ScoreOptions(answer_fallback=fallback, special_tokens=tuple(specials)),
        )
        return _example_row("nq", "dev", row, t, get_method("direct"), None, 0.1, m)

    strict = row_for(t.text, "none")
    assert (
        strict["prediction"] is None and strict["em"] == 0.0 and strict["answer_source"] == "none"
    )
    loose = row_for(t.text, "response")
    assert (loose["prediction"], loose["em"], loose["answer_source"]) == ("Paris", 1.0, "fallback")
    assert loose["well_formed"] == 0.0  # the format check stays strict
    tagged = row_for("<answer> Paris </answer>", "response")
    assert tagged["answer_source"] == "tag" and tagged["em"] == 1.0
