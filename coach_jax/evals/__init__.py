"""What the coaching did: behaviour on held-out prompts, forgetting against the base model,
and the run report."""
