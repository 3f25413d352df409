"""A small, real DDP job: an MLP on deterministic synthetic data, checkpoint and resume.

Runs on the nodes under torchrun (`invoke train`, or plain `torchrun --standalone
--nproc-per-node 2 scripts/train_ddp.py`); reads RANK / WORLD_SIZE / LOCAL_RANK from torchrun.
Stdlib + torch only. Lines tests and `invoke train` rely on (flushed):

    rank 1/2: first step                   every rank, at its first step
    rank 1: resumed from epoch 1           every rank, when a checkpoint was loaded
    epoch 2 loss 0.04913370                rank 0, mean over ranks of the epoch's losses
    rank 0 checksum 9f86d081884c7d65       every rank at the end: identical when DDP worked

Epochs count from 1; `--fail-at-step N` counts steps across epochs from 0.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import struct
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

FEATURES = 16
CHECKPOINT = "checkpoint.pt"


def say(line: str) -> None:
    """One write per line: ranks share the terminal (or pipe), and print's separate write of
    the newline lets another rank's line land in between."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=20, help="per rank")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", type=Path, help="rank 0 saves here; all resume")
    parser.add_argument("--fail-at-step", type=int, help="raise at this global step (tests)")
    parser.add_argument("--fail-rank", type=int, default=0, help="the rank that fails")
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step")
    # torch.distributed.launch (deprecated) passes this; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


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


def load_checkpoint(
    directory: Path | None, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device
) -> int:
    """The last finished epoch (0 if none). Rank 0 reads the file and sends it to every rank,
    so nodes need no shared filesystem; every rank then loads it."""
    path = directory / CHECKPOINT if directory else None
    found = dist.get_rank() == 0 and path is not None and path.exists()
    payload = broadcast_bytes(path.read_bytes() if found else b"", device)
    if not payload:
        return 0
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    say(f"rank {dist.get_rank()}: resumed from epoch {state['epoch']}")
    return int(state["epoch"])


def save_checkpoint(
    directory: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int
) -> None:
    """Write then rename: a crash mid-save leaves the previous checkpoint intact."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{CHECKPOINT}.{os.getpid()}.tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}, tmp)
    os.replace(tmp, directory / CHECKPOINT)


def checksum(model: nn.Module) -> str:
    """sha256 of all parameters as float64 bytes (16 hex digits): one token, equal on every
    rank if and only if the replicas stayed bit-for-bit in sync."""
    flat = torch.cat([p.detach().double().cpu().flatten() for p in model.parameters()]).tolist()
    return hashlib.sha256(struct.pack(f"<{len(flat)}d", *flat)).hexdigest()[:16]


def run_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer,
              args: argparse.Namespace, epoch: int, first: bool) -> torch.Tensor:  # fmt: skip
    """One epoch on this rank; returns (loss sum, steps) for the all-reduce."""
    rank, device = dist.get_rank(), next(model.parameters()).device
    total = torch.zeros(2, device=device)
    for i, (x, y) in enumerate(loader):
        step = (epoch - 1) * len(loader) + i
        if first and i == 0:
            say(f"rank {rank}/{dist.get_world_size()}: first step")
        if step == args.fail_at_step and rank == args.fail_rank:
            raise RuntimeError(f"rank {rank}: injected failure at step {step} (--fail-at-step)")
        loss = nn.functional.mse_loss(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients across ranks here
        opt.step()
        total += torch.stack([loss.detach(), torch.ones((), device=device)])
        time.sleep(args.step_sleep)
    return total


def train(args: argparse.Namespace) -> None:
    rank, world, device = setup(args.backend)
    try:
        data = synthetic_data(args.steps_per_epoch * args.batch_size * world, args.seed)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, seed=args.seed)
        loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)
        module = make_model(args.seed).to(device)
        model = DistributedDataParallel(
            module, device_ids=[device] if device.type == "cuda" else None
        )
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        start = load_checkpoint(args.checkpoint_dir, module, opt, device) + 1
        for epoch in range(start, args.epochs + 1):
            sampler.set_epoch(epoch)  # a different, still deterministic, shuffle per epoch
            total = run_epoch(model, loader, opt, args, epoch, first=epoch == start)
            dist.all_reduce(total)
            if rank == 0:
                say(f"epoch {epoch} loss {(total[0] / total[1]).item():.8f}")
                if args.checkpoint_dir:
                    save_checkpoint(args.checkpoint_dir, module, opt, epoch)
        say(f"rank {rank} checksum {checksum(module)}")
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
