"""QA data: the dataset registry and preparation (``prepare``), prompt rendering (``prompts``),
and the synthetic fictional world (``synth``)."""
