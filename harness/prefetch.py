"""Step 1 of a GRPO step, the pictures: which images each step trains on (BatchSampler), loaded in
worker threads while the previous step trains (Prefetch)."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import data


class BatchSampler:
    """Step 1 of GRPO: which images each step trains on, a pure function of (seed, step, global
    batch), so resuming needs only the step.

    Each step draws one dataset (in proportion to its size) and takes that set's next B x world
    images (the global batch) from a seeded permutation that is redrawn every epoch of that set;
    rank r keeps images r*B .. r*B+B-1 of them. Every rank computes the same global batch.
    """

    def __init__(self, sets: dict[str, list], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.sets, self.batch_size, self.seed = sets, batch_size * world, seed
        self.per_rank, self.rank = batch_size, rank
        self.names = list(sets)
        sizes = np.array([len(v) for v in sets.values()], dtype=float)
        self.weights = sizes / sizes.sum()
        self.choices: list[int] = []

    def choice(self, step: int) -> int:
        while len(self.choices) <= step:
            rng = np.random.default_rng([self.seed, len(self.choices)])
            self.choices.append(int(rng.choice(len(self.names), p=self.weights)))
        return self.choices[step]

    def batch(self, step: int) -> tuple[str, list]:
        k = self.choice(step)
        seen = sum(1 for s in range(step) if self.choice(s) == k) * self.batch_size
        items, n = self.sets[self.names[k]], len(self.sets[self.names[k]])
        picks = [(seen + i) for i in range(min(self.batch_size, n))]
        mine = picks[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        order = lambda epoch: np.random.default_rng([self.seed, k, epoch]).permutation(n)
        return self.names[k], [items[order(p // n)[p % n]] for p in mine]

    def epoch(self, step: int) -> float:
        """Passes over all training images completed before `step`."""
        return step * self.batch_size / sum(len(v) for v in self.sets.values())

    def dataset(self, step: int) -> str:
        """The training set that step `step` draws from (the same on every rank)."""
        return self.names[self.choice(step)]

    def is_video(self, step: int) -> bool:
        return self.sets[self.dataset(step)][0].is_video


class Prefetch:
    """Loads the next step's pictures in worker threads while the current step trains: step 1's
    images, in --groups-per-step groups of B.

    The workers run at the lowest CPU priority (on Linux a thread has its own nice value): torch's
    threads, which wait for each other at every operation, keep the cores, so a decoding thread
    taking one of them cannot stall them all; decoding gets the time they leave, and all of it
    while the loop waits for a step's pictures."""

    def __init__(self, run, cfg):
        self.run, self.max_pixels = run, cfg.max_pixels
        self.size, self.groups = cfg.images_per_step, cfg.groups_per_step
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
