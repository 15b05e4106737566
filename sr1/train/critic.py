"""PPO's critic: a scalar value head on a copy of the policy's base transformer."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

Tensor = torch.Tensor


class Critic(nn.Module):
    """``V(s_t)`` for every position: backbone hidden states -> linear -> ``(B, T)``."""

    def __init__(self, backbone: nn.Module, hidden_size: int, seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.v_head = nn.Linear(hidden_size, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            # small random init: a zero head would give the backbone no gradient at first
            w = torch.randn(self.v_head.weight.shape, generator=g) / hidden_size
            self.v_head.weight.copy_(w.to(self.v_head.weight.dtype))
            self.v_head.bias.zero_()
        self.v_head.to(next(backbone.parameters()).device)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        h = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # (B, T, H)
        return self.v_head(h.to(self.v_head.weight.dtype)).squeeze(-1)  # (B, T)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype, device: str, seed: int = 0) -> Critic:
        """A fresh critic from a causal-LM checkpoint (``path``) or a saved critic folder."""
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(path, dtype=dtype).to(device)
        critic = cls(backbone, backbone.config.hidden_size, seed)
        head = Path(path) / "v_head.pt"
        if head.is_file():
            state = torch.load(head, map_location="cpu", weights_only=True)  # tensors only
            critic.v_head.load_state_dict(state)
        return critic

    @property
    def _no_split_modules(self) -> list[str]:
        """The backbone's decoder layer classes (what FSDP wraps one by one)."""
        return list(getattr(self.backbone, "_no_split_modules", None) or [])

    def save(self, out: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """The backbone as an HF model folder plus ``v_head.pt``; ``state_dict`` (this module's
        full keys, e.g. gathered from FSDP shards) replaces the live weights."""
        if state_dict is None:
            self.backbone.save_pretrained(out)
            torch.save(self.v_head.state_dict(), out / "v_head.pt")
            return
        sub = {
            k.removeprefix("backbone."): v
            for k, v in state_dict.items()
            if k.startswith("backbone.")
        }
        head = {
            k.removeprefix("v_head."): v for k, v in state_dict.items() if k.startswith("v_head.")
        }
        from sr1.train.checkpoint import skeleton

        skeleton(self.backbone, causal_lm=False).save_pretrained(out, state_dict=sub)
        torch.save(head, out / "v_head.pt")

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable()
