"""RL math (advantages, losses, KL, entropy) as pure tensor functions, and the reward functions.

``sr1.algos.core`` holds the math with registries ``ADV_ESTIMATORS``, ``POLICY_LOSSES``,
``KL_ESTIMATORS`` and ``LOSS_AGG_MODES``; ``sr1.algos.rewards`` holds ``REWARDS``.
"""
