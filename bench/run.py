"""jaxcam benchmarks, side by side with the PyTorch stack the seed projects used.

    python -m bench.run [--sections train pipeline eval cam] [--batch N] [--width W] [--out FILE]

Each section measures jaxcam and its PyTorch counterpart in this one process, on random
arrays of the CIFAR shape, and prints absolute figures with ratios. On a CPU the defaults
are small (batch 64); on a GPU they follow the default recipe (batch 512).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import describe, import_pytorch_grad_cam, timed, torch_device_and_sync  # noqa: E402

MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
# Dense peak throughput (FLOP/s) for model-FLOPs utilization, by device kind substring.
# float32 convolutions run as TF32 on the tensor cores (JAX's default precision), so that is
# the float32 peak. H100/H200 SXM: 989.4 (bf16) and 494.7 (TF32) TFLOP/s dense.
PEAK_FLOPS = {"H100": {"bfloat16": 989.4e12, "float32": 494.7e12}, "H200": {"bfloat16": 989.4e12, "float32": 494.7e12},
              "A100": {"bfloat16": 312e12, "float32": 156e12}}


def on_gpu() -> bool:
    import jax

    return jax.devices()[0].platform == "gpu"


def _print_rates(results: dict) -> dict:
    for name, row in results.items():
        print(f"  {name}: {row['images_per_s']:,.0f} images/s", flush=True)
    return results


# ----------------------------------------------------------------------------- training


def bench_jax_train(width: int, batch: int, dtype: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from jaxcam import models, train as train_lib

    model = models.ResNet18(width=width, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    mesh = train_lib.make_mesh()
    lr, momentum = train_lib.onecycle(1000, 0.4)
    tx = optax.chain(optax.add_decayed_weights(5e-4),
                     optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=momentum, nesterov=True))
    state = train_lib.replicate(train_lib.create_train_state(model, jax.random.key(0), tx), mesh)
    step = train_lib.make_train_step(model, mesh, MEAN, STD, label_smoothing=0.1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    x, y = train_lib.shard_batch((images, labels), mesh)
    start = time.perf_counter()
    lowered = step.lower(state, x, y)
    compiled = lowered.compile()
    state, metrics = compiled(state, x, y)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    # XLA's cost analysis of the lowered (not yet optimized) program: on a GPU the compiled
    # program hides its convolutions inside cuDNN custom calls, whose FLOPs it does not count.
    # The lowered count skips the products with padding, so it is below the conventional
    # 3.33 GFLOP per training image at full width (ResNet18: 0.56 GMAC forward, x2, x3).
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_xla = float(cost.get("flops", 0.0)) * len(jax.devices())
    flops_conventional = 3.33e9 * batch * (width / 64) ** 2

    def run_steps():
        nonlocal state
        for _ in range(steps):
            state, m = compiled(state, x, y)
        return m

    seconds = timed(run_steps, repeats=3, sync=jax.block_until_ready) / steps
    result = {"images_per_s": batch / seconds, "step_s": seconds, "first_step_s": first, "epoch_50k_s": 50_000 / (batch / seconds),
              "flops_per_step_xla": flops_xla, "flops_per_step_conventional": flops_conventional}
    kind = jax.devices()[0].device_kind
    peak = next((v[dtype] for k, v in PEAK_FLOPS.items() if k in kind), None)
    if peak and on_gpu():
        result["mfu_xla"] = flops_xla / seconds / (peak * len(jax.devices()))
        result["mfu_conventional"] = flops_conventional / seconds / (peak * len(jax.devices()))
    return result


def bench_torch_train(width: int, batch: int, steps: int, mode: str) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    from bench.torch_resnet import ResNet18

    device, sync = torch_device_and_sync()
    if mode != "eager_fp32" and device == "cpu":
        return None
    torch.manual_seed(0)
    model = ResNet18(width=width).to(device)
    memory_format = torch.channels_last if mode == "tuned" else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    # A tensor learning rate lets torch.compile trace the scheduler's per-step changes instead of
    # recompiling for each new float (with a float lr it hits its recompile limit within 8 steps
    # and leaves the optimizer step eager), as PyTorch's compiled-optimizer tutorial does.
    lr = torch.tensor(0.1) if mode == "tuned" else 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.4, total_steps=100_000)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)
    use_amp = mode == "tuned"

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_amp):
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss

    forward_step = torch.compile(step) if mode == "tuned" else step
    model.train()
    start = time.perf_counter()
    sync(forward_step())
    first = time.perf_counter() - start
    for _ in range(3):  # the momentum schedule's second value makes it dynamic: one recompilation
        sync(forward_step())

    def run_steps():
        out = None
        for _ in range(steps):
            out = forward_step()
        return out

    seconds = timed(run_steps, repeats=3, sync=sync) / steps
    return {"images_per_s": batch / seconds, "step_s": seconds, "first_step_s": first, "epoch_50k_s": 50_000 / (batch / seconds)}


def section_train(args) -> dict:
    results = {}
    for dtype in args.dtypes:
        results[f"jaxcam_{dtype}"] = bench_jax_train(args.width, args.batch, dtype, args.steps)
        print(f"  jaxcam {dtype}: {results[f'jaxcam_{dtype}']['images_per_s']:.1f} images/s", flush=True)
    for mode in ("eager_fp32", "tuned") if args.torch else ():
        r = bench_torch_train(args.width, args.batch, args.steps, mode)
        if r is not None:
            results[f"torch_{mode}"] = r
            print(f"  torch {mode}: {r['images_per_s']:.1f} images/s", flush=True)
    return results


# ----------------------------------------------------------------------------- input pipeline


def section_pipeline(args) -> dict:
    from jaxcam import data as data_lib

    n = 10_240 if not on_gpu() else 50_000
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int32)
    batch = 512
    fill = tuple(int(round(v)) for v in MEAN * 255)

    def augment_all():
        g = np.random.default_rng(1)
        for i in range(0, n, batch):
            data_lib.augment_batch(images[i : i + batch], g, fill=fill)

    def augment_and_normalize_all():
        g = np.random.default_rng(1)
        for i in range(0, n, batch):
            data_lib.normalize(data_lib.augment_batch(images[i : i + batch], g, fill=fill), MEAN, STD)

    def threaded_epoch():
        aug = lambda x, g, **rows: data_lib.augment_batch(x, g, fill=fill, **rows)
        for _ in data_lib.prefetch(data_lib.train_batches(images, labels, batch, seed=0, epoch=1, augment=aug), size=3):
            pass

    results = {
        "jaxcam_augment": {"images_per_s": n / timed(augment_all, 3)},
        "jaxcam_augment_normalize_host": {"images_per_s": n / timed(augment_and_normalize_all, 3)},
        "jaxcam_epoch_background_thread": {"images_per_s": n / timed(threaded_epoch, 3)},
    }
    try:
        import albumentations as A
        import cv2

        transform = A.Compose([
            A.PadIfNeeded(min_height=40, min_width=40, border_mode=cv2.BORDER_CONSTANT, fill=0),
            A.RandomCrop(32, 32),
            A.HorizontalFlip(),
            A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(16, 16), hole_width_range=(16, 16),
                            fill=tuple(float(v) for v in MEAN * 255), p=0.5),
            A.Normalize(mean=tuple(MEAN), std=tuple(STD)),
        ])
        subset = images[:2048]

        def albumentations_all():
            for image in subset:
                transform(image=image)

        results["albumentations_per_image"] = {"images_per_s": len(subset) / timed(albumentations_all, 3)}
    except ImportError:
        pass
    return _print_rates(results)


# ----------------------------------------------------------------------------- eval and CAM


def section_eval(args) -> dict:
    import jax

    from jaxcam import models, train as train_lib

    model = models.ResNet18(width=args.width)
    mesh = train_lib.make_mesh()
    variables = train_lib.replicate(models.init_variables(model, jax.random.key(0)), mesh)
    predict_fn = train_lib.make_predict_fn(model, mesh, MEAN, STD)
    batch = args.eval_batch
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    x = train_lib.shard_batch(images, mesh)
    jax.block_until_ready(predict_fn(variables, x))
    results = {"jaxcam": {"images_per_s": batch / timed(lambda: predict_fn(variables, x), 5, jax.block_until_ready)}}
    try:
        import torch

        from bench.torch_resnet import ResNet18

        device, sync = torch_device_and_sync()
        reference = ResNet18(width=args.width).to(device).eval()
        tx = torch.randn(batch, 3, 32, 32, device=device)
        with torch.no_grad():
            reference(tx)
            results["torch_eager_fp32"] = {"images_per_s": batch / timed(lambda: reference(tx), 5, sync)}
    except ImportError:
        pass
    return _print_rates(results)


def section_cam(args) -> dict:
    import jax

    from jaxcam import cam, models

    model = models.ResNet18(width=args.width)
    variables = models.init_variables(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    results = {}
    grad_cam = import_pytorch_grad_cam()
    torch_model = None
    if grad_cam is not None:
        import torch

        from bench.torch_resnet import ResNet18

        device, _ = torch_device_and_sync()
        torch_model = ResNet18(width=args.width).to(device).eval()
        classes = {"gradcam": grad_cam.GradCAM, "gradcam++": grad_cam.GradCAMPlusPlus, "hirescam": grad_cam.HiResCAM,
                   "xgradcam": grad_cam.XGradCAM, "layercam": grad_cam.LayerCAM, "eigencam": grad_cam.EigenCAM,
                   "scorecam": grad_cam.ScoreCAM}
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    for method in cam.METHODS:
        n = args.cam_batch if method != "scorecam" or on_gpu() else 4
        images = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
        targets = np.arange(n) % 10
        run = lambda: cam.compute(model, variables, images, layer="layer3", targets=targets, method=method)
        run()  # compile
        row = {"batch": n, "jaxcam_cams_per_s": n / timed(run, 3)}
        if torch_model is not None:
            tensor = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
            with classes[method](model=torch_model, target_layers=[torch_model.layer3[-1]]) as extractor:
                if method == "scorecam":
                    extractor.batch_size = 256
                torch_targets = [ClassifierOutputTarget(int(t)) for t in targets]
                call = lambda: extractor(input_tensor=tensor, targets=torch_targets)
                call()
                row["pytorch_grad_cam_cams_per_s"] = n / timed(call, 3)
            row["speedup"] = row["jaxcam_cams_per_s"] / row["pytorch_grad_cam_cams_per_s"]
        results[method] = row
        print(f"  {method}: {row}", flush=True)
    return results


# ----------------------------------------------------------------------------- end to end


def _median(values: list[float]) -> float | None:
    """The median of `values`, or None for none (a one-epoch run has no later epochs)."""
    return float(np.median(values)) if values else None


def section_e2e(args) -> dict:
    """train_and_evaluate of the default recipe on CIFAR-shaped random data: wall time with
    compilation, the input pipeline, evaluation and checkpoints included."""
    import tempfile

    from bench import e2e
    from jaxcam import configuration, data as data_lib, train as train_lib

    gpu = on_gpu()
    n_train, n_test = (50_000, 10_000) if gpu else (5_120, 1_024)
    rng = np.random.default_rng(0)
    dataset = data_lib.Cifar10(
        rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n_train).astype(np.int32),
        rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n_test).astype(np.int32),
        data_lib.CIFAR10_CLASSES)
    config = configuration.load_config_file(ROOT / "configs" / "default.py")
    config.update(dict(epochs=args.e2e_epochs or (20 if gpu else 1), width=args.width if gpu else 16,
                       batch_size=args.batch, print_summary=False, tensorboard=False))
    ends = []  # wall time at the end of each epoch (after its evaluation and checkpoint)
    spent, compiles = e2e.instrument()
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        result = train_lib.train_and_evaluate(config, run_dir, dataset=dataset, progress=False, log=lambda s: None,
                                              on_epoch_end=lambda epoch, record: ends.append(time.perf_counter()))
        total = time.perf_counter() - start
    epoch_times = [r["epoch_time"] for r in result.history]
    # Seconds the train loop waited for the input pipeline (the device's idle time for data).
    data_waits = [r["data_wait"] for r in result.history]
    # Between two epoch ends: that epoch's training, then its evaluation and checkpoint.
    between = [b - a - t for a, b, t in zip(ends, ends[1:], epoch_times[1:])]
    out = {"epochs": config.epochs, "train_images": n_train, "width": config.width, "dtype": train_lib.resolve_dtype(config.dtype),
           "total_s": total, "first_epoch_s": epoch_times[0], "steady_epoch_s": _median(epoch_times[1:]) or epoch_times[0],
           "train_s": float(sum(epoch_times)),
           "setup_and_first_eval_s": ends[0] - start - epoch_times[0],
           "eval_and_checkpoint_per_epoch_s": _median(between),
           "finish_s": start + total - ends[-1],
           "data_wait_s": float(sum(data_waits)), "data_wait_per_later_epoch_s": _median(data_waits[1:]),
           # Where the wall time went (bench/e2e.py's phases), and each function's compilation.
           "phases_s": e2e.breakdown(spent, result.history, total), "compile_s": dict(compiles)}
    print(f"  {out}", flush=True)
    return out


# ----------------------------------------------------------------------------- report


def _rate_rows(title: str, section: dict, base_key: str, base_name: str, ratio_digits: int) -> list[str]:
    """A markdown table of images/s per entry of `section`, each as a ratio to `section[base_key]`."""
    base = section.get(base_key, {}).get("images_per_s")
    lines = [f"| {title} | images/s | vs {base_name} |", "|---|---:|---:|"]
    for name, r in section.items():
        ratio = f"{r['images_per_s'] / base:.{ratio_digits}f}x" if base else "n/a"
        lines.append(f"| {name} | {r['images_per_s']:,.0f} | {ratio} |")
    return [*lines, ""]


def table(results: dict) -> str:
    lines = []
    if "train" in results:
        t = results["train"]
        base = t.get("torch_eager_fp32", {}).get("images_per_s")
        tuned = t.get("torch_tuned", {}).get("images_per_s")
        lines += ["| training step | images/s | s per 50k epoch | first step (s) | vs torch eager fp32 | vs torch tuned | MFU (XLA count / 3.33 GFLOP) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in t.items():
            ratio = f"{r['images_per_s'] / base:.2f}x" if base else "n/a"
            ratio_tuned = f"{r['images_per_s'] / tuned:.2f}x" if tuned else "n/a"
            mfu = f"{100 * r['mfu_xla']:.1f}% / {100 * r['mfu_conventional']:.1f}%" if "mfu_xla" in r else "n/a"
            lines.append(f"| {name} | {r['images_per_s']:,.1f} | {r['epoch_50k_s']:,.1f} | {r['first_step_s']:.1f} | {ratio} | {ratio_tuned} | {mfu} |")
        lines.append("")
    if "pipeline" in results:
        lines += _rate_rows("input pipeline", results["pipeline"], "albumentations_per_image", "albumentations", 1)
    if "eval" in results:
        lines += _rate_rows("evaluation", results["eval"], "torch_eager_fp32", "torch eager fp32", 2)
    if "cam" in results:
        lines += ["| CAM method (layer3) | batch | jaxcam CAMs/s | pytorch-grad-cam CAMs/s | speed-up |", "|---|---:|---:|---:|---:|"]
        for name, r in results["cam"].items():
            torch_rate = r.get("pytorch_grad_cam_cams_per_s")
            torch_text = f"{torch_rate:,.1f}" if torch_rate else "n/a"
            speedup = f"{r['speedup']:.2f}x" if torch_rate else "n/a"
            lines.append(f"| {name} | {r['batch']} | {r['jaxcam_cams_per_s']:,.1f} | {torch_text} | {speedup} |")
    if "e2e" in results:
        e = results["e2e"]
        lines += ["", f"End to end: {e['epochs']} epochs of {e['train_images']:,} images (width {e['width']}, {e['dtype']}) "
                  f"in {e['total_s']:.1f} s with compilation and evaluation; steady epoch {e['steady_epoch_s']:.2f} s; "
                  f"first epoch {e['first_epoch_s']:.1f} s; set-up and first evaluation "
                  f"{e['setup_and_first_eval_s']:.1f} s; evaluation and checkpoint per later epoch "
                  f"{e['eval_and_checkpoint_per_epoch_s'] or 0:.2f} s; finish {e['finish_s']:.1f} s; "
                  f"waiting for input {e['data_wait_s']:.2f} s in all."]
        if "phases_s" in e:  # results of an earlier harness lack them
            lines += ["", "Phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in e["phases_s"].items())
                      + "; compiling (s): " + ", ".join(f"{k} {v:.1f}" for k, v in e["compile_s"].items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["train", "pipeline", "eval", "cam"],
                        choices=["train", "pipeline", "eval", "cam", "e2e"])
    parser.add_argument("--e2e-epochs", type=int, default=None, help="epochs for the e2e section (GPU: 20)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="compute dtypes of the jaxcam train step")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="train section: jaxcam only")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 512 on GPU, 64 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat")
    parser.add_argument("--eval-batch", type=int, default=None)
    parser.add_argument("--cam-batch", type=int, default=64)
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/<device>.json)")
    args = parser.parse_args(argv)
    gpu = on_gpu()
    args.batch = args.batch or (512 if gpu else 64)
    args.steps = args.steps or (20 if gpu else 3)
    args.eval_batch = args.eval_batch or (1000 if gpu else 250)
    results = {"device": describe(), "args": {k: v for k, v in vars(args).items() if k != "out"}}
    for section in args.sections:
        print(f"[{section}]", flush=True)
        results[section] = globals()[f"section_{section}"](args)
    text = table(results)
    print(text)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{'gpu' if gpu else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, "table": text}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
