"""Time and memory of the step bench: PhaseClock, which times functions where the training code calls
them, phase by phase, and the peak memory of a call (measure).

A hook is held by reference: hook(grpo.score_rollout, "reward") finds, from the function's own
__module__ and __qualname__, the module or class whose attribute the training code calls it by,
and refuses a function that is not there. A renamed function therefore fails where the bench names
it, at import, not part way through a measurement.
"""
from __future__ import annotations

import re
import resource
import sys
import time

import torch


def hook(fn, phase: str) -> tuple[object, str, str]:
    """(where fn is looked up when called: its module, or the class it is a method of; its name there;
    the phase it is timed as). ValueError when fn is not that attribute (e.g. a local function)."""
    where = sys.modules[fn.__module__]
    *path, name = fn.__qualname__.split(".")
    for part in path:
        where = getattr(where, part, None)
    if vars(where or object).get(name) is not fn:
        raise ValueError(f"{fn.__module__}.{fn.__qualname__} is not an attribute of its module or class: "
                         f"it cannot be timed where it is called")
    return where, name, phase


class PhaseClock:
    """Seconds per phase (`seconds`, every one of `phases` from 0). While active (`with`), each of
    `hooks` (hook(...) each) is replaced by a timed version of itself, and put back on exit.

    Each phase gets its own time only: a timed call inside another (a backward inside the loss) is
    taken off the outer one. `timed(phase, fn)` times anything else the same way. On CUDA the device
    is synchronised around each timed call, so the time is the work's, not its launch's."""

    def __init__(self, device: torch.device, phases, hooks=()):
        self.device, self.hooks = device, hooks
        self.seconds, self.inner, self.originals = dict.fromkeys(phases, 0.0), [], []

    def timed(self, phase: str, fn):
        def run(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            self.inner.append(0.0)  # the time of the calls inside this one
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                elapsed, inner = time.perf_counter() - start, self.inner.pop()
                self.seconds[phase] += elapsed - inner
                if self.inner:
                    self.inner[-1] += elapsed

        return run

    def __enter__(self):
        for where, name, phase in self.hooks:
            original = vars(where)[name]
            self.originals.append((where, name, original))
            setattr(where, name, self.timed(phase, original))
        return self

    def __exit__(self, *exc):
        while self.originals:
            where, name, original = self.originals.pop()
            setattr(where, name, original)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak below is the lifetime peak


def peak_memory(device: torch.device) -> int:
    """Peak bytes since the last reset: max allocated on CUDA, peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure(fn, device: torch.device):
    """fn() -> (its result, seconds, peak bytes during the call)."""
    sync(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start, peak_memory(device)
