"""A small, real DDP job: an MLP on deterministic synthetic data, checkpoints and resume.

Runs on the nodes under torchrun (`invoke train`, or plain `torchrun --standalone
--nproc-per-node 2 scripts/train_ddp.py`); reads RANK / WORLD_SIZE / LOCAL_RANK from torchrun.
Stdlib + torch only. It follows ddpfleet's checkpoint contract (README "where your checkpoints
go"), so a run resumed on other nodes, or by a recovery, ends with the same weights:

- checkpoints go to $DDPFLEET_CHECKPOINT_DIR (ddpfleet sets it for every run), else to
  --checkpoint-dir (plain torchrun); none without either. Each is a directory step-<8 digits>/
  of files, then MANIFEST.json written last, atomically; every node's LOCAL_RANK 0 writes its
  node's copy. The run resumes from the newest COMPLETE one (every file's SHA-256 as listed).
- the data a step trains on depends only on (--seed, step), never on what ran before;
- with DDPFLEET_PROGRESS_FILE set, LOCAL_RANK 0 writes {"step": steps done, "time": t} there
  after each step.

Lines tests and `invoke train` rely on (flushed):

    rank 1/2: first step                   every rank, at its first step
    rank 1: resumed from epoch 1 step 4    every rank, when a checkpoint was loaded
    checkpoint loaded in 0.012s            rank 0, then: reading, verifying, sending, loading
    epoch 2 loss 0.04913370                rank 0, mean over ranks of the epoch's losses
    rank 0 checksum 9f86d081884c7d65       every rank at the end: identical when DDP worked
    final model sha256 <64 hex>            rank 0 at the end (also in <checkpoints>/final.json)

Epochs count from 1; steps count across epochs from 0 (`--fail-at-step N`), and a checkpoint's
step is the number of steps done.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

FEATURES = 16
FORMAT = "ddpfleet.checkpoint/1"
MANIFEST = "MANIFEST.json"
FILES = ("model.pt", "optimizer.pt")


def say(line: str) -> None:
    """One write per line: ranks share the terminal (or pipe), and print's separate write of
    the newline lets another rank's line land in between."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint-dir", type=Path, help="where checkpoints go without $DDPFLEET_CHECKPOINT_DIR"
    )
    parser.add_argument("--checkpoint-every", type=int, help="steps (default: each epoch's end)")
    parser.add_argument("--keep-checkpoints", type=int, default=3, help="the newest N complete")
    parser.add_argument("--fail-at-step", type=int, help="raise at this global step (tests)")
    parser.add_argument("--fail-rank", type=int, default=0, help="the rank that fails")
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step")
    parser.add_argument(
        "--write-sleep", type=float, default=0.0, help="seconds before a manifest (tests)"
    )
    parser.add_argument(
        "--write-sleep-at", type=int, help="only the checkpoint of this step (default: each)"
    )
    # torch.distributed.launch (deprecated) passes this; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def checkpoint_dir(args: argparse.Namespace) -> Path | None:
    """ddpfleet's dir for this run wins: a recovery or `train --resume` puts the checkpoint to
    resume from there, whatever the script's own flags say."""
    given = os.environ.get("DDPFLEET_CHECKPOINT_DIR")
    if given:
        if args.checkpoint_dir and dist.get_rank() == 0:
            say(f"checkpoints in $DDPFLEET_CHECKPOINT_DIR {given}, not --checkpoint-dir")
        return Path(given)
    return args.checkpoint_dir


def setup(backend: str) -> tuple[int, int, torch.device]:
    """Join the process group; (rank, world size, device). NCCL when CUDA is there."""
    if "WORLD_SIZE" not in os.environ:  # plain `python train_ddp.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), device


def synthetic_data(size: int, seed: int) -> TensorDataset:
    """y = x @ w + noise, the same on every rank and every run (its own generator)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, FEATURES, generator=gen)
    w = torch.randn(FEATURES, 1, generator=gen)
    return TensorDataset(x, x @ w + 0.1 * torch.randn(size, 1, generator=gen))


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # same start everywhere (DDP also broadcasts rank 0's weights)
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 1))


def broadcast_bytes(payload: bytes, device: torch.device) -> bytes:
    """Rank 0's bytes on every rank. Not broadcast_object_list: it needs numpy, nodes may not."""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if size.item() == 0:
        return b""
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def complete(path: Path) -> dict | None:
    """The manifest of a complete checkpoint dir, or None (what ddpfleet's node side checks
    too): no manifest, a file missing or with another SHA-256, a .tmp name: never loaded."""
    if ".tmp" in path.name or not path.name.startswith("step-"):
        return None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("format") != FORMAT or path.name != f"step-{manifest['step']:08d}":
            return None
        files = manifest["files"]
        ok = all("/" not in n and sha256_file(path / n) == h for n, h in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if ok and set(FILES) <= set(files) else None


def steps_in(directory: Path) -> list[Path]:
    """step-<n> dirs, newest first."""
    try:
        found = [p for p in directory.iterdir() if p.name.startswith("step-")]
    except OSError:
        return []
    return sorted((p for p in found if p.name[5:].isdigit()), key=lambda p: -int(p.name[5:]))


def newest_complete(directory: Path | None) -> tuple[Path, dict] | None:
    for path in steps_in(directory) if directory else []:
        manifest = complete(path)
        if manifest is not None:
            return path, manifest
    return None


def load_checkpoint(
    directory: Path | None, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device
) -> int:
    """Steps done by the newest complete checkpoint (0 if none). Rank 0 reads and verifies it
    and sends it to every rank, so the other nodes' copies need not be there; all then load."""
    found = newest_complete(directory) if dist.get_rank() == 0 else None
    step = torch.tensor([found[1]["step"] if found else -1], dtype=torch.int64, device=device)
    dist.broadcast(step, src=0)
    if step.item() < 0:
        return 0
    states = {}
    for name in FILES:
        payload = broadcast_bytes((found[0] / name).read_bytes() if found else b"", device)
        states[name] = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    model.load_state_dict(states["model.pt"])
    opt.load_state_dict(states["optimizer.pt"])
    return int(step.item())


def write_file(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename: a reader sees the whole file or none."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int,
                    write_sleep: float) -> None:  # fmt: skip
    """step-<n>/ with each file written atomically, then MANIFEST.json last: a node killed
    before the manifest leaves a partial checkpoint that is never loaded."""
    path = directory / f"step-{step:08d}"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = {}
    for name, state in zip(FILES, (model.state_dict(), opt.state_dict())):
        buf = io.BytesIO()
        torch.save(state, buf)
        write_file(path / name, buf.getvalue())
        files[name] = hashlib.sha256(buf.getvalue()).hexdigest()
    time.sleep(write_sleep)
    manifest = {"format": FORMAT, "step": step, "world_size": dist.get_world_size(),
                "files": files, "time": time.time()}  # fmt: skip
    write_file(path / MANIFEST, json.dumps(manifest, sort_keys=True).encode())
    fsync_dir(path)


def prune(directory: Path, keep: int) -> None:
    """The newest `keep` complete checkpoints stay, and anything newer (never the newest
    complete one); older ones, and partial ones older than the newest complete, go."""
    done = 0
    for path in steps_in(directory):
        if complete(path) is not None:
            done += 1
            if done <= max(1, keep):
                continue
        elif done == 0:
            continue
        shutil.rmtree(path, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def batch(data: TensorDataset, seed: int, step: int, rank: int, size: int, world: int):
    """This rank's part of step `step`'s global batch: a permutation drawn from (seed, step)
    alone, so a run resumed at any step trains on exactly what an uninterrupted one would."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    picked = torch.randperm(len(data), generator=gen)[: size * world][rank * size :][:size]
    return data[picked]


def checksum(model: nn.Module) -> str:
    """sha256 of all parameters as float64 bytes: one token, equal on every rank if and only
    if the replicas stayed bit-for-bit in sync."""
    flat = torch.cat([p.detach().double().cpu().flatten() for p in model.parameters()]).tolist()
    return hashlib.sha256(struct.pack(f"<{len(flat)}d", *flat)).hexdigest()


class Trainer:
    """The loop: a step, its progress record, a checkpoint when one is due, a loss per epoch."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, data: TensorDataset,
                 opt: torch.optim.Optimizer, ckpt: Path | None) -> None:  # fmt: skip
        self.args, self.model, self.data, self.opt, self.ckpt = args, model, data, opt, ckpt
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.writer = int(os.environ.get("LOCAL_RANK", "0")) == 0  # one copy per node
        self.every = args.checkpoint_every or args.steps_per_epoch
        self.progress = os.environ.get("DDPFLEET_PROGRESS_FILE")

    def step(self, step: int) -> torch.Tensor:
        args, device = self.args, next(self.model.parameters()).device
        if step == args.fail_at_step and self.rank == args.fail_rank:
            raise RuntimeError(
                f"rank {self.rank}: injected failure at step {step} (--fail-at-step)"
            )
        x, y = batch(self.data, args.seed, step, self.rank, args.batch_size, self.world)
        loss = nn.functional.mse_loss(self.model(x.to(device)), y.to(device))
        self.opt.zero_grad()
        loss.backward()  # DDP averages the gradients across ranks here
        self.opt.step()
        time.sleep(args.step_sleep)
        return loss.detach()

    def run(self, start: int, total: int) -> None:
        device = next(self.model.parameters()).device
        spe, loss_sum = self.args.steps_per_epoch, torch.zeros(2, device=device)
        for step in range(start, total):
            if step == start:
                say(f"rank {self.rank}/{self.world}: first step")
            loss_sum += torch.stack([self.step(step), torch.ones((), device=device)])
            done = step + 1
            if self.writer and self.progress:
                write_json(Path(self.progress), {"step": done, "time": time.time()})
            if self.writer and self.ckpt and (done % self.every == 0 or done == total):
                at = self.args.write_sleep_at
                slow = self.args.write_sleep if at is None or at == done else 0.0
                save_checkpoint(self.ckpt, self.model.module, self.opt, done, slow)
                prune(self.ckpt, self.args.keep_checkpoints)
            if done % spe == 0 or done == total:
                dist.all_reduce(loss_sum)
                if self.rank == 0:
                    say(f"epoch {-(-done // spe)} loss {(loss_sum[0] / loss_sum[1]).item():.8f}")
                loss_sum.zero_()


def settle_buckets(model: nn.Module, data: TensorDataset, device: torch.device) -> None:
    """One backward pass whose gradients are thrown away, before any step. DDP lays its
    gradient buckets out again after its first backward (in the order the gradients became
    ready), and with more than two ranks gloo then adds each gradient's parts in another
    order. So every real step, the first after a resume too, runs on that second layout and
    a resumed run ends bit for bit where an uninterrupted one does (6 ranks: it did not)."""
    x = data.tensors[0][:1].to(device)
    model(x).sum().mul(0).backward()
    model.zero_grad(set_to_none=True)


def train(args: argparse.Namespace) -> None:
    rank, world, device = setup(args.backend)
    try:
        data = synthetic_data(args.steps_per_epoch * args.batch_size * world, args.seed)
        module = make_model(args.seed).to(device)
        model = DistributedDataParallel(
            module, device_ids=[device] if device.type == "cuda" else None
        )
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        settle_buckets(model, data, device)
        ckpt = checkpoint_dir(args)
        began = time.monotonic()
        start = load_checkpoint(ckpt, module, opt, device)
        if start:
            say(f"rank {rank}: resumed from epoch {start // args.steps_per_epoch} step {start}")
            if rank == 0:  # bench/recovery.py reports it apart from the checkpoint's transfer
                say(f"checkpoint loaded in {time.monotonic() - began:.3f}s")
        total = args.epochs * args.steps_per_epoch
        Trainer(args, model, data, opt, ckpt).run(start, total)
        digest = checksum(module)
        say(f"rank {rank} checksum {digest[:16]}")
        if rank == 0:
            say(f"final model sha256 {digest}")
            if ckpt:
                final = {"sha256": digest, "step": total, "world_size": world, "time": time.time()}
                write_json(ckpt / "final.json", final)
        leave()
    finally:  # reached only on a failure: leave() does not return
        dist.destroy_process_group()


def leave() -> NoReturn:
    """Leave together, then end this process without tearing the interpreter down.

    After a collective returns, the gloo worker thread that ran it still holds the finished
    work and drops it (and the tensors in it) a moment later; dropping a tensor Python has seen
    takes the GIL. If the interpreter is finalizing by then, CPython (< 3.14) ends that thread
    with pthread_exit, whose unwinding through the work's noexcept destructor calls
    std::terminate: "terminate called without an active exception", SIGABRT, and torchrun
    fails a run that trained. Freeing the group first is no way out: its destructor joins that
    thread while holding the GIL, a deadlock. destroy_process_group() does neither for gloo,
    so skip finalization: every rank has passed the barrier, the output is flushed here, and
    nothing else is pending (a checkpoint is written and renamed before this). A rank that
    fails raises before this point and exits non-zero as before.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    train(parse_args())
