"""One rank of the 2-process DDP check (run by test_ddp.py through torchrun, gloo on CPU).

Each rank updates on *different* trajectories; DDP all-reduces the gradients, so after the
updates every rank must hold the same parameters. Writes this rank's parameters to OUT/rank-R.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sr1.train.trainer import RLTrainer  # noqa: E402
from tests.train.helpers import hand_trajectories, tiny_cfg  # noqa: E402


def main(model: str, out: str) -> None:
    torch.set_num_threads(1)
    cfg = tiny_cfg("grpo", "trainer.mini_batch_size=4", "trainer.micro_batch_size=2")
    tr = RLTrainer(cfg, model_path=model)
    rank, world = tr.acc.process_index, tr.acc.num_processes
    assert world == 2, f"expected 2 processes, got {world}"
    trajs = hand_trajectories(tr.tokenizer, n_prompts=4)
    mine = [t for i, t in enumerate(trajs) if (i // 2) % world == rank]  # different data per rank
    for _ in range(2):
        tr.step_on(mine)
    params = {n: p.detach().cpu().clone() for n, p in tr.model.named_parameters()}
    torch.save({"rank": rank, "params": params, "ids": [t.id for t in mine]},
               Path(out) / f"rank-{rank}.pt")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
