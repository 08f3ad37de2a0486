"""The next step's pictures, loaded in worker threads while the current step trains."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import data


class Prefetch:
    """Loads the next step's pictures in worker threads while the current step trains: step 1's
    images, in --groups-per-step groups of B.

    The workers run at the lowest CPU priority (on Linux a thread has its own nice value): torch's
    threads, which wait for each other at every operation, keep the cores, so a decoding thread
    taking one of them cannot stall them all; decoding gets the time they leave, and all of it
    while the loop waits for a step's pictures."""

    def __init__(self, run, cfg):
        self.run, self.size, self.groups, self.max_pixels = run, cfg.images_per_step, cfg.groups_per_step, cfg.max_pixels
        self.pool = ThreadPoolExecutor(max(1, cfg.workers), initializer=lowest_priority)
        self.pending = {run.start: self.submit(run.start)}

    def submit(self, step: int):
        items, b = self.run.sampler.batch(step)[1], self.size
        return self.pool.submit(lambda: [load_visuals(items[k * b:(k + 1) * b], self.max_pixels)
                                         for k in range(self.groups)])

    def load(self, step: int) -> tuple[list[tuple[list, list, int]], list[str]]:
        """The step's groups, (items, pictures, the first's place in the global batch) each (what
        grpo.Group takes), and what could not be read; starts loading step + 1's."""
        if step + 1 < self.run.steps:
            self.pending[step + 1] = self.submit(step + 1)
        groups, problems, comm = [], [], self.run.comm
        for k, loaded in enumerate(self.pending.pop(step).result()):
            items, visuals, failed = keep_in_step(comm, *loaded)
            groups.append((items, visuals, (comm.rank * self.groups + k) * self.size))
            problems += failed
        return groups, problems

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=False, cancel_futures=True)


def keep_in_step(comm, items: list, visuals: list, problems: list[str]):
    """This process's readable images of a group. Under --fsdp every process runs the same passes, so
    each keeps as many as the process with fewest (the others are counted as skipped)."""
    if not comm.sharded:
        return items, visuals, problems
    n = int(comm.sum([len(items)], "min")[0])
    dropped = [f"{it.path} (kept out to keep the ranks in step under --fsdp)" for it in items[n:]]
    return items[:n], visuals[:n], problems + dropped


def lowest_priority() -> None:
    """The calling thread to nice 19 where the system allows it (Linux); elsewhere nothing changes."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def load_visuals(items: list, max_pixels: int | None) -> tuple[list, list, list[str]]:
    """Read each item's picture(s); an unreadable one is skipped and reported, never fatal."""
    kept, visuals, problems = [], [], []
    for item in items:
        try:
            v = data.read_visual(item.path, max_pixels=max_pixels)
        except data.DataError as e:
            problems.append(str(e))
            continue
        kept.append(item)
        visuals.append(v if isinstance(v, list) else [v])
    return kept, visuals, problems
