"""The harness of the distributed tests: 2 spawned gloo ranks (file:// rendezvous, one thread each) run a
table of cases one after another; rank 0 saves every case's result, or its traceback, for pytest to check."""

import datetime
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def run_cases(rank: int, folder: str, cases: dict, results: dict, skip=lambda name: False) -> None:
    """Runs `cases` ({name: (function, args)}; an argument "FOLDER" is replaced by `folder`) on this rank."""
    # a timeout: a case that fails on one rank only must not leave the other waiting in a collective forever
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'rendezvous')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        for name, (fn, args) in cases.items():
            if skip(name):
                continue
            try:
                results[name] = fn(*(folder if a == "FOLDER" else a for a in args))
            except Exception:  # noqa: BLE001  (reported by the test of this case)
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        if rank == 0:
            torch.save(results, os.path.join(folder, "results.pt"))
        dist.destroy_process_group()


def spawn(worker, folder: str) -> dict:
    """Runs worker(rank, folder) on WORLD spawned ranks and returns rank 0's results."""
    context = mp.start_processes(worker, args=(folder,), nprocs=WORLD, join=False, start_method="spawn")
    while not context.join(timeout=900):
        pass
    return torch.load(os.path.join(folder, "results.pt"))


def result(results: dict, name: str) -> dict:
    r = results[name]
    assert "error" not in r, r.get("error")
    return r
