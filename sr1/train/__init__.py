"""RL training (``sr1 train``) and the supervised format warm-start (``sr1 sft``).

``batch`` turns trajectories into padded tensors and per-token log-probs; ``critic`` is PPO's
value model; ``checkpoint`` writes and reads atomic HF checkpoints with trainer state;
``trainer`` orchestrates rollout -> reward -> advantages -> updates; ``sft`` builds gold
trajectories and fine-tunes on them with the same mask.
"""
