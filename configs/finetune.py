"""The fine-tuning job's recipe, now in the package: :mod:`ssl_jax.finetuning.default_config`."""

from ssl_jax.finetuning.default_config import get_config  # noqa: F401
