r"""Weights in and out: ``python -m ssl_jax.convert import|export``.

Import a local weights file (timm, torchvision, DINO, MAE, BEiT; ``.safetensors`` or ``.pth``)
as a run directory that evaluation, fine-tuning and ``--config.init_from`` accept::

    python -m ssl_jax.convert import --weights dino_vits16_pretrain.pth \
        --config configs/dino.py:data=cifar10,model=vit_s16 --workdir /tmp/dino_imported
    python -m ssl_jax.convert import --weights vit.safetensors --model_from_file \
        --config configs/simclr.py:data=digits --workdir /tmp/vit_imported [--num_heads N]

Export a run's encoder to a timm-loadable safetensors file (and ``FILE.json``: the timm model
name, kwargs and, for CIFAR-stem or narrow ResNets, the lines that complete the model)::

    python -m ssl_jax.convert export --workdir RUN --output encoder.safetensors [--step N]

Bad input (a missing, truncated, non-weights or refused file, a file of another architecture
than the config, a target that exists without ``--overwrite``) ends with one ``error:`` line
and exit code 2, and nothing is written. See docs/weights.md.
"""

from __future__ import annotations

import json

from absl import flags, logging
from ml_collections import config_flags

COMMANDS = ("import", "export")


def define_flags() -> None:
    config_flags.DEFINE_config_file(
        "config", None, "import: the config of the run to write (method, data, model).")
    flags.DEFINE_string("weights", None, "import: the local weights file to read.")
    flags.DEFINE_string("workdir", None, "import: the run directory to write; export: the run "
                        "whose encoder is exported.")
    flags.DEFINE_string("output", None, "export: the .safetensors file to write.")
    flags.DEFINE_integer("step", -1, "export: the checkpoint step (-1: the latest).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --workdir (import) or --output "
                      "(export).")
    flags.DEFINE_bool("model_from_file", False, "import: set config.model to the file's "
                      "architecture instead of checking the file against it.")
    flags.DEFINE_integer("num_heads", 0, "import with --model_from_file: attention heads of a ViT"
                         " whose width is not a standard one (192, 384, 768, 1024, 1280).")
    flags.DEFINE_bool("allow_pickle_classes", False, "import: accept a .pth that holds harmless "
                      "classes beside its tensors (argparse.Namespace); still read with "
                      "torch.load(weights_only=True).")
    flags.DEFINE_string("checkpoint_key", "", "import: the entry of a training checkpoint that "
                        "holds the weights (default: teacher, then model, state_dict, ...).")


def _required(**values) -> None:
    missing = [f"--{k}" for k, v in values.items() if v is None]
    if missing:
        raise flags.Error(f"{' and '.join(missing)} required")


def main(argv: list[str]) -> None:
    from ssl_jax import parallel
    from ssl_jax.convert import run_dir, timm_export

    args = flags.FLAGS
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise flags.Error(f"give one command, import or export (got {argv[1:]}): python -m "
                          "ssl_jax.convert import --weights FILE --config CONFIG --workdir DIR")
    parallel.initialize_distributed()
    if argv[1] == "import":
        _required(weights=args.weights, config=args.config, workdir=args.workdir)
        config = args.config
        if args.model_from_file:
            model = run_dir.fit_model_to_file(config, args.weights, args.num_heads,
                                              args.allow_pickle_classes, args.checkpoint_key)
            logging.info("the file's model: %s", model)
        record = run_dir.import_weights(
            args.weights, config, args.workdir, overwrite=args.overwrite,
            allow_classes=args.allow_pickle_classes, checkpoint_key=args.checkpoint_key)
        print(f"imported {args.weights} into {args.workdir} ({config.method}, "
              f"{config.model.name})")
        for note in record["notes"]:
            print(f"  - {note}")
        print(f"evaluate:  python -m ssl_jax.evaluate --workdir {args.workdir}")
        print(f"fine-tune: python -m ssl_jax.finetune --workdir {args.workdir}")
        print(f"pre-train: python -m ssl_jax.train --config ... --config.init_from="
              f"{args.workdir} --model_from_init --workdir NEW_DIR")
    else:
        _required(workdir=args.workdir, output=args.output)
        spec = run_dir.export_timm(args.workdir, args.output, step=args.step,
                                   overwrite=args.overwrite)
        print(f"exported the encoder of {args.workdir} (step {spec['step']}) to {args.output}; "
              f"timm model and kwargs in {args.output}.json:")
        print(json.dumps({k: spec[k] for k in ("model_name", "kwargs", "patch")}))
        print(timm_export.loading_snippet(spec, args.output))


if __name__ == "__main__":
    from ssl_jax import cli

    define_flags()
    cli.run(main)
