"""End-to-end fine-tuning of a run's encoder with a linear classifier (the job behind
``python -m ssl_jax.finetune``).

- :mod:`~ssl_jax.finetuning.job`: the job (config, model, state, checkpoints, results);
- :mod:`~ssl_jax.finetuning.steps`: its train step and test-set top-1;
- :mod:`~ssl_jax.finetuning.classifier`: the encoder + pooled linear head, layer-wise decay ids;
- :mod:`~ssl_jax.finetuning.data`: the labelled loader (class-balanced label fractions);
- :mod:`~ssl_jax.finetuning.mixup`: mixup and cutmix with label smoothing;
- :mod:`~ssl_jax.finetuning.default_config`: the recipes (``get_config(arg)``).
"""
