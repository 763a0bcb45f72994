"""An independent, short JAX trainer for the learning check, sharing no code with jaxcam.

    python bench/plain_check.py [seed=0] [cutout=0.5] [lr=0.4] [ls=0.1] [wd=5e-4] [pct=0.25]
                                [width=16] [epochs=15] [batch=128] [data=PATH]

It trains the CIFAR ResNet18 (width 16, 15 epochs at batch 128 unless told) on ../shared/data/cifar10-subset,
or on `data=`, an archive of class folders (train/<class>/*.jpg, test/<class>/*.jpg) such as
../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz, with crop 4 + flip + Cutout 16 (probability `cutout`),
SGD + Nesterov, weight decay and optax's one-cycle, and prints the test accuracy after each epoch. It
exists to cross-check jaxcam's learning-check figures (bench/LEARNING.md) against a plain script written
from scratch. Differences from jaxcam: it augments in normalized space, so the crop pads with the mean,
not black, and its momentum is a constant 0.9 (jaxcam cycles it from 0.95 to 0.85 and back).
"""

import functools
import io
import pickle
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from configs import shared_subset  # the subset's location only; no jaxcam code

args = dict(a.split("=", 1) for a in sys.argv[1:])
SOURCE = args.pop("data", None)
args = {k: float(v) for k, v in args.items()}
SEED, CUT, LR = int(args.get("seed", 0)), args.get("cutout", 0.5), args.get("lr", 0.4)
LS, WD, PCT = args.get("ls", 0.1), args.get("wd", 5e-4), args.get("pct", 0.25)
WIDTH, EPOCHS, BATCH = int(args.get("width", 16)), int(args.get("epochs", 15)), int(args.get("batch", 128))
SUBSET = shared_subset()
if SOURCE is None and SUBSET is None:
    sys.exit("plain_check needs ../shared/data/cifar10-subset beside this checkout, or data=ARCHIVE.")
DATA = Path(SUBSET or ".") / "cifar-10-batches-py"


def load_archive(path):  # {split: (images, labels)}, classes in sorted folder order
    def decode(data):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    files = {"train": [], "test": []}
    with tarfile.open(path) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[0] in files:
                files[parts[0]].append((parts[1], tar.extractfile(member).read()))
    classes = sorted({c for c, _ in files["train"]})
    with ThreadPoolExecutor() as pool:  # Pillow decodes outside the GIL
        return {split: (np.stack(list(pool.map(decode, [d for _, d in items]))),
                        np.array([classes.index(c) for c, _ in items], np.int32)) for split, items in files.items()}


def load(names):
    batches = [pickle.loads((DATA / n).read_bytes(), encoding="bytes") for n in names]
    x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, np.concatenate([b[b"labels"] for b in batches]).astype(np.int32)


if SOURCE:
    (xtr, ytr), (xte, yte) = load_archive(SOURCE).values()
else:
    xtr, ytr = load([f"data_batch_{i}" for i in range(1, 6)])
    xte, yte = load(["test_batch"])
print(f"{len(xtr)} training and {len(xte)} test images", flush=True)
mean, std = xtr.reshape(-1, 3).mean(0) / 255, xtr.reshape(-1, 3).std(0) / 255


def norm(x):
    return ((x / 255.0 - mean) / std).astype(np.float32)


test_inputs = norm(xte)  # once, not every epoch
i32 = np.arange(32)


def augment(x, rng):  # in normalized space, where 0 is the mean: crop pads and Cutout fills with it
    n = len(x)
    padded = np.pad(norm(x), ((0, 0), (4, 4), (4, 4), (0, 0)))
    dy, dx = rng.integers(0, 9, (2, n, 1, 1))
    x = padded[np.arange(n)[:, None, None], dy + i32[:, None], dx + i32[None, :]]
    flip = rng.random(n) < 0.5
    x[flip] = x[flip, :, ::-1]
    cy, cx = rng.integers(0, 32, (2, n, 1, 1))  # a 16x16 square centred anywhere, clipped at the border
    rows, cols = (i32[:, None] >= cy - 8) & (i32[:, None] < cy + 8), (i32[None, :] >= cx - 8) & (i32[None, :] < cx + 8)
    x[rows & cols & (rng.random(n) < CUT)[:, None, None]] = 0.0
    return x


conv = functools.partial(nn.Conv, use_bias=False, kernel_init=nn.initializers.kaiming_normal())


def norm_layer(train):  # PyTorch's BatchNorm2d momentum 0.1
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)


class Block(nn.Module):
    features: int
    stride: int

    @nn.compact
    def __call__(self, x, train):
        s = (self.stride, self.stride)
        y = nn.relu(norm_layer(train)(conv(self.features, (3, 3), s, padding=1)(x)))
        y = norm_layer(train)(conv(self.features, (3, 3), padding=1)(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = norm_layer(train)(conv(self.features, (1, 1), s)(x))
        return nn.relu(y + x)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.relu(norm_layer(train)(conv(WIDTH, (3, 3), padding=1)(x)))
        for i, stride in enumerate([1, 2, 2, 2]):
            x = Block(WIDTH * 2**i, 1)(Block(WIDTH * 2**i, stride)(x, train), train)
        return nn.Dense(10)(x.mean((1, 2)))


net, batch, epochs = Net(), BATCH, EPOCHS
steps = len(xtr) // batch
variables = net.init(jax.random.key(SEED), jnp.zeros((1, 32, 32, 3)), False)
tx = optax.chain(optax.add_decayed_weights(WD),
                 optax.sgd(optax.cosine_onecycle_schedule(steps * epochs, LR, PCT, 25.0, 1e4), 0.9, nesterov=True))
params, stats = variables["params"], variables["batch_stats"]
opt = tx.init(params)


@jax.jit
def train_step(params, stats, opt, x, y):
    def loss_fn(p):
        logits, new = net.apply({"params": p, "batch_stats": stats}, x, True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(y, 10), LS)).mean(), new

    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), new["batch_stats"], opt, loss


predict = jax.jit(lambda p, s, x: net.apply({"params": p, "batch_stats": s}, x, False).argmax(-1))
rng, start = np.random.default_rng(SEED), time.time()
for epoch in range(epochs):
    order = rng.permutation(len(xtr))
    for k in range(steps):
        idx = order[k * batch:(k + 1) * batch]
        params, stats, opt, loss = train_step(params, stats, opt, augment(xtr[idx], rng), ytr[idx])
    hits = sum(int((predict(params, stats, test_inputs[i:i + 500]) == yte[i:i + 500]).sum()) for i in range(0, len(xte), 500))
    print(f"epoch {epoch + 1}: loss {float(loss):.3f}, test {100 * hits / len(xte):.2f}%, {time.time() - start:.0f} s", flush=True)
