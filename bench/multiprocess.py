"""The cost of cross-process collectives: the train step of 2 processes x 1 device against
1 process x 2 devices, at the same global batch, on this machine's CPU.

    python -m bench.multiprocess [--width 16] [--batch 128] [--steps 10] [--repeats 3]

Each layout runs in fresh processes (jax.distributed on 127.0.0.1 with gloo for the two
processes, `--xla_force_host_platform_device_count=2` for the one), in turn, never together. A
third layout, two unjoined processes each stepping on half the batch at the same time, parts the
cost of two processes sharing the cores from the cost of their collectives.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def worker(args) -> None:
    """Time the train step on this process's share of a global batch; process 0 prints the JSON."""
    sys.path.insert(0, str(ROOT))
    from jaxcam import distributed

    if args.num_processes > 1:
        distributed.initialize(args.address, args.num_processes, args.process_id)
    import jax
    import optax

    from jaxcam import models, train as train_lib

    mean, std = np.array([0.49, 0.48, 0.45], np.float32), np.array([0.25, 0.24, 0.26], np.float32)
    model = models.ResNet18(width=args.width)
    mesh = train_lib.make_mesh()
    tx = optax.sgd(0.01, momentum=0.9, nesterov=True)
    state = train_lib.create_train_state(model, jax.random.key(0), tx, mesh)
    step = train_lib.make_train_step(model, mesh, mean, std)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.batch).astype(np.int32)
    rows = distributed.process_rows(args.batch, mesh)
    x, y = train_lib.shard_batch((images[rows], labels[rows]), mesh)
    state, metrics = step(state, x, y)  # compile and warm up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, x, y)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - start) / args.steps)
    if distributed.is_main_process():
        print(json.dumps({"step_s": float(np.median(times)), "devices": len(mesh.devices.flat),
                          "processes": jax.process_count(), "device_kind": jax.devices()[0].device_kind}))


def run_layout(args, processes: int, joined: bool = True) -> dict:
    """The worker's result for `processes` processes sharing 2 devices in all; unjoined, each
    steps on its share of the batch alone (the mean of their step times)."""
    batch = args.batch if joined else args.batch // processes
    base = [sys.executable, "-m", "bench.multiprocess", "--worker", "--width", str(args.width), "--batch",
            str(batch), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    env = {**os.environ, "XLA_FLAGS": "" if processes > 1 else "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    join = lambda i: ["--num_processes", str(processes), "--process_id", str(i), "--address", address]  # noqa: E731
    started = [subprocess.Popen(base + (join(i) if joined and processes > 1 else []), cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, text=True) for i in range(processes)]
    outputs = [process.communicate()[0] for process in started]
    if any(process.returncode for process in started):
        raise RuntimeError(f"A worker failed: {[p.returncode for p in started]}")
    # Gloo prints its connections on stdout too; only the main processes print a result.
    results = [json.loads(line) for out in outputs for line in out.splitlines() if line.startswith("{")]
    return {**results[0], "step_s": float(np.mean([r["step_s"] for r in results]))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128, help="the global batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--num_processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--address", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    one = run_layout(args, 1)
    two = run_layout(args, 2)
    apart = run_layout(args, 2, joined=False)
    print(f"ResNet18 width {args.width}, global batch {args.batch}, on {one['device_kind']}:")
    for name, result in (("1 process x 2 devices", one), ("2 processes x 1 device", two),
                         (f"2 unjoined processes, {args.batch // 2} each", apart)):
        print(f"  {name + ':':32} {1000 * result['step_s']:6.1f} ms/step ({args.batch / result['step_s']:,.0f} "
              "images/s)")
    print(f"  ratio (2 processes / 1 process): {two['step_s'] / one['step_s']:.2f}x the step time; "
          f"unjoined / 1 process: {apart['step_s'] / one['step_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
