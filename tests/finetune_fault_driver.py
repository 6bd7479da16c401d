r"""The fine-tuning job, started like ``python -m ssl_jax.finetune``, with one fault of
``tests/fault_driver.py`` injected (the loop is the trainer's, so are the faults).

    PYTHONPATH=. python tests/finetune_fault_driver.py --fault=KIND[:N] --workdir RUN --config ...
"""

from __future__ import annotations

import fault_driver  # defines --fault (this script's folder is on sys.path)
from absl import flags

from ssl_jax.finetuning import job


def main(argv: list[str]) -> None:
    fault_driver.install(flags.FLAGS.fault)
    job.main(argv)


if __name__ == "__main__":
    job.run_command(main)
