r"""The fine-tuning command (the job lives in :mod:`ssl_jax.finetuning`):

    python -m ssl_jax.finetune --workdir RUN [--config configs/finetune.py:ARG] [--config.K=V ...]

See :mod:`ssl_jax.finetuning.job` for what it does and writes."""

from ssl_jax.finetuning.job import RESULTS_FILE, finetune, load_config, main  # noqa: F401

if __name__ == "__main__":
    from ssl_jax.finetuning import job

    job.run_command()
