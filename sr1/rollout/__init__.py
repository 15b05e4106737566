"""Search-augmented rollouts: engines (HF, vLLM) and the multi-turn loop that builds the loss mask."""
