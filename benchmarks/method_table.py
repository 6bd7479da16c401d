r"""One table of methods on one budget: pre-train each method's preset for the same number of steps
at the same batch on the same backbone, evaluate each with the evaluation job, and write a
Markdown table of linear / kNN top-1 beside the random-init encoder, the final loss and the
training throughput::

    python -m benchmarks.method_table --data cifar10 --data_root $HOME/.cache/ssl_jax/cifar10 \
        --methods simclr,byol,moco_v2,moco_v3,rotation,context,jigsaw,colorization,inpainting \
        --steps 1950 --batch_size 256 --out /tmp/table --parallel 3
    python -m benchmarks.method_table ... --set model.dtype=bfloat16   # any --config.KEY=VALUE

Each method runs as the user runs it: ``python -m ssl_jax.train --config configs/M.py:data=D``
then ``python -m ssl_jax.evaluate`` (t-SNE off), in ``OUT/M``, with these overrides on top of
the preset: ``total_steps``, ``batch_size``, ``model.name`` (``--model``, for the methods whose
preset encoder is of the same family), every ``*_epochs`` key of the preset's schedules scaled
by budget / ``num_epochs`` (the schedule compressed to the budget: a 10-epoch warm-up of a
200-epoch preset becomes 5% of the budget; DINO's teacher-temperature warm-up likewise),
checkpoints at the end only, and every ``--set``. Whatever else the preset says (augmentations,
optimizer, learning rate, heads, temperatures) stays the paper's or the public recipe's, so the
table compares recipes at an equal number of steps, not tuned runs.

``--parallel P`` runs P methods at once (the GPU is shared; each JAX process gets
``XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 / P`` unless that is set). A method whose run already
has an ``eval.json`` is not run again (re-running the script fills in what failed), and a
failed method is reported in the table with its log's path, not hidden. ``--deadline S``
stops starting new methods after S seconds, and ``--stop_training_at S`` stops the trainings
still running after S seconds (SIGTERM, so the trainer saves its checkpoint) and evaluates them
at the step they reached (the table's ``step`` column says which), so that a time-limited job
still writes its table.
The table is rewritten after every method (``OUT/table.md``, also printed at the end). A
SIGTERM to this script (a ``timeout`` around it) stops it cleanly: running trainings get SIGTERM
(they save a checkpoint), running evaluations are ended, nothing new starts, the table of what
finished is written, and the exit code is 143.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

EXIT_PREEMPTED = 75  # ssl_jax.faults: the trainer saved a checkpoint on SIGTERM and stopped
INTERRUPT = threading.Event()  # set by SIGTERM to this script: stop everything, keep what finished
RESNET_METHODS = ("simclr", "byol", "moco_v2", "moco_v3", "rotation", "context", "jigsaw",
                  "colorization", "inpainting")


def schedule_overrides(args: argparse.Namespace, method: str) -> list[str]:
    """Each ``*_epochs`` key of the preset's schedules (the LR warm-up, DINO's teacher-temperature
    warm-up, ...; not the evaluation's) scaled by budget / ``num_epochs``: the preset's schedule
    compressed to the budget, so that a warm-up keeps its share of the run."""
    from benchmarks.throughput import load_config

    config = load_config(f"configs/{method}.py:data={args.data}")
    scale = args.steps * args.batch_size / args.num_train / config.num_epochs

    def walk(tree: dict, prefix: str = ""):
        for key, value in tree.items():
            if isinstance(value, dict) and key != "eval":
                yield from walk(value, f"{prefix}{key}.")
            elif (key.endswith("_epochs") and f"{prefix}{key}" != "num_epochs"
                  and isinstance(value, (int, float)) and value > 0):
                yield f"--config.{prefix}{key}={round(value * scale, 6)}"

    return list(walk(config.to_dict()))


def train_command(args: argparse.Namespace, method: str, workdir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "ssl_jax.train", "--config",
           f"configs/{method}.py:data={args.data}", "--workdir", str(workdir),
           f"--config.total_steps={args.steps}", f"--config.batch_size={args.batch_size}",
           f"--config.log_every={args.log_every}", f"--config.checkpoint.every_steps={args.steps}",
           *schedule_overrides(args, method)]
    if args.data_root:
        cmd.append(f"--config.data.root={args.data_root}")
    if args.model and (method in RESNET_METHODS) == args.model.startswith("resnet"):
        cmd.append(f"--config.model.name={args.model}")
    return cmd + [f"--config.{item}" for item in args.set]


def eval_command(args: argparse.Namespace, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "ssl_jax.evaluate", "--workdir", str(workdir),
            "--config.eval.tsne_points=0", *[f"--config.{item}" for item in args.eval_set]]


def run_method(args: argparse.Namespace, method: str, env: dict[str, str], start: float
               ) -> dict:
    workdir = Path(args.out) / method
    if (workdir / "eval.json").exists():
        return summarize(method, workdir, "done earlier")
    if args.deadline and time.time() - start > args.deadline:
        return {"method": method, "status": "not started (deadline)"}
    if INTERRUPT.is_set():
        return {"method": method, "status": "not started (interrupted)"}
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "job.log"
    began, status = time.time(), "ok"
    with open(log, "a") as f:
        for cmd, stoppable in ((train_command(args, method, workdir), True),
                               (eval_command(args, workdir), False)):
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            print(f"{method}: {'training' if stoppable else 'evaluating'} "
                  f"({time.time() - start:.0f} s)", flush=True)
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            stopped = False
            while proc.poll() is None:
                late = args.stop_training_at and time.time() - start > args.stop_training_at
                if not stopped and (INTERRUPT.is_set() or (stoppable and late)):
                    proc.send_signal(signal.SIGTERM)  # the trainer saves, then exits with 75
                    stopped = True
                time.sleep(0.2)
            if INTERRUPT.is_set():
                return {"method": method, "status": "interrupted (SIGTERM); " + (
                    "its checkpoint was saved" if stoppable else "evaluation ended")}
            if stopped and proc.returncode == EXIT_PREEMPTED:
                status = "stopped by --stop_training_at"
            elif proc.returncode != 0:
                print(f"{method}: exit {proc.returncode}, see {log}", flush=True)
                return {"method": method, "status": f"failed (exit {proc.returncode}, {log})"}
    out = summarize(method, workdir, status)
    out["wall_s"] = time.time() - began
    print(f"{method}: {json.dumps(out)}", flush=True)
    return out


def summarize(method: str, workdir: Path, status: str) -> dict:
    """Linear / kNN top-1 of the run and of its random-init encoder (``eval.json``'s latest), the
    last logged loss and the median images/s of the logged intervals after the first step."""
    latest = json.loads((workdir / "eval.json").read_text())["latest"]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    rows = [r for r in rows if "loss" in r]
    speeds = [r["images_per_sec"] for r in rows[1:] if "images_per_sec" in r]
    out = {"method": method, "status": status, "step": latest["step"],
           "linear": latest["ssl"]["linear_top1"], "knn": latest["ssl"]["knn_top1"],
           "loss": rows[-1]["loss"] if rows else float("nan"),
           "images_per_sec": statistics.median(speeds) if speeds else float("nan")}
    if "random_init" in latest:
        out.update(random_linear=latest["random_init"]["linear_top1"],
                   random_knn=latest["random_init"]["knn_top1"])
    return out


def table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Budget: {args.steps} steps of batch {args.batch_size} on {args.data}"
             f"{', model ' + args.model if args.model else ''}"
             f"{', ' + ', '.join(args.set) if args.set else ''}.", "",
             "| method | step | linear top-1 | kNN top-1 | random init linear / kNN | final loss "
             "| images/s | status |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: -r.get("linear", -1.0)):
        if "linear" not in r:
            lines.append(f"| {r['method']} | | | | | | | {r['status']} |")
            continue
        rnd = (f"{100 * r['random_linear']:.2f} / {100 * r['random_knn']:.2f}"
               if "random_linear" in r else "")
        lines.append(f"| {r['method']} | {r['step']} | {100 * r['linear']:.2f} "
                     f"| {100 * r['knn']:.2f} | {rnd} | {r['loss']:.4g} "
                     f"| {r['images_per_sec']:.0f} | {r['status']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(RESNET_METHODS))
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--data_root", default="")
    parser.add_argument("--num_train", type=int, default=50000,
                        help="training images: the budget in epochs, for the schedules")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--model", default="", help="encoder for every method of its family")
    parser.add_argument("--log_every", type=int, default=100)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run")
    parser.add_argument("--eval_set", action="append", default=[],
                        help="KEY=VALUE for every evaluation, e.g. eval.max_train_examples=5000")
    parser.add_argument("--out", required=True)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="seconds after which no method starts; 0: none")
    parser.add_argument("--stop_training_at", type=float, default=0.0,
                        help="seconds after which running trainings are stopped (SIGTERM: a "
                             "checkpoint is saved) and evaluated at the step reached; 0: never")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    missing = [m for m in methods if not Path(f"configs/{m}.py").exists()]
    if missing or args.steps < 1 or args.parallel < 1:
        parser.error(f"unknown methods {missing} (configs/M.py)" if missing
                     else "--steps and --parallel must be >= 1")
    args.methods = methods
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = dict(os.environ)
    if args.parallel > 1:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / args.parallel:.3f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start, results = time.time(), []
    signal.signal(signal.SIGTERM, lambda *_: INTERRUPT.set())
    with ThreadPoolExecutor(args.parallel) as pool:
        pending = {pool.submit(run_method, args, m, env, start) for m in args.methods}
        while pending:  # the table as each method ends, in any order; short waits let the
            done, pending = wait(pending, 0.5, FIRST_COMPLETED)  # SIGTERM handler run
            for future in done:
                results.append(future.result())
                (Path(args.out) / "table.md").write_text(table(results, args))
    print(table(results, args), flush=True)
    if INTERRUPT.is_set():
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
