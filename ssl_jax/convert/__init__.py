"""Weights in and out: timm / torchvision / DINO / MAE / BEiT files <-> the project's runs.

- :mod:`.files`: reading safetensors and (with torch, weights only) ``.pth`` files without
  running code from them; writing safetensors.
- :mod:`.formats`: the official checkpoints' wrappers, prefixes and names, brought to timm's.
- :mod:`.keymap`: timm / torchvision names and layouts <-> the project's Flax trees (ViT, ResNet,
  DINO's head, MAE's decoder).
- :mod:`.fit`: the architecture a file holds; a file checked against, and fitted to, a config's
  encoder (position embeddings resampled to its grid).
- :mod:`.init_from`: weights into a fresh train state (``--config.init_from``, the import).
- :mod:`.timm_export`: the timm model name, kwargs and ``state_dict`` of an encoder.
- :mod:`.run_dir`: a file as a run directory (:func:`import_weights`), a run's encoder as a
  timm file (:func:`export_timm`).

``python -m ssl_jax.convert import|export`` is the command line; docs/weights.md the guide.
"""

from ssl_jax.convert.files import WeightsError, read_weights

__all__ = ["WeightsError", "export_timm", "import_weights", "read_weights"]


def import_weights(*args, **kwargs):
    """:func:`ssl_jax.convert.run_dir.import_weights` (imported on use: JAX and the methods)."""
    from ssl_jax.convert import run_dir

    return run_dir.import_weights(*args, **kwargs)


def export_timm(*args, **kwargs):
    """:func:`ssl_jax.convert.run_dir.export_timm` (imported on use: JAX and the methods)."""
    from ssl_jax.convert import run_dir

    return run_dir.export_timm(*args, **kwargs)
