"""coach_jax: supervised fine-tuning of decoder LLMs in JAX / Flax."""

__version__ = "0.1.0"


def generate(*args, **kwargs):
    """`coach_jax.sampling.generate`: the next assistant turn for each conversation."""
    from coach_jax.sampling import generate as _generate
    return _generate(*args, **kwargs)
