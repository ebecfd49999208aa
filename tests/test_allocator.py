"""asign_sc._allocator: freed memory kept for reuse while a step runs (glibc only)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

import asign_sc as asc
from asign_sc import _allocator
from asign_sc._allocator import reuse_freed_memory, reuses_freed_memory

glibc_only = pytest.mark.skipif(
    _allocator._glibc() is None, reason="malloc is not glibc's here: the setting does nothing"
)

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB)


FRESH_PROCESS_SCRIPT = """
import json, resource, torch
from asign_sc._allocator import reuse_freed_memory

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def faults(times=8):
    # minor page faults while a 64 MiB tensor is allocated, filled and freed `times` times
    block = torch.ones(2**24); del block  # warm-up, not counted
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        block = torch.ones(2**24); del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

counts = {"outside": faults()}
with reuse_freed_memory():
    with reuse_freed_memory():
        counts["nested"] = faults()
    counts["outer"] = faults()
start = rss()
with reuse_freed_memory():
    blocks = [torch.ones(2**24) for _ in range(4)]  # 4 x 64 MiB
    del blocks
    kept = rss()
returned = rss()
counts["rss"] = {"start": start, "kept": kept, "returned": returned}
print(json.dumps(counts))
"""


@pytest.fixture(scope="module")
def fresh_process():
    """What :data:`FRESH_PROCESS_SCRIPT` measured in a process of its own (a clean heap)."""
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_blocks_are_reused_inside(fresh_process):
    # Without the block every allocation of the 64 MiB tensor faults in its 16,384 pages
    # afresh; inside it (and after an inner block ends), hardly any does. A torch tensor:
    # numpy asks for huge pages on large arrays, torch (the case at hand) does not.
    counts = fresh_process
    pages = BLOCK // resource.getpagesize()
    assert counts["outside"] >= 7 * pages
    assert counts["nested"] <= 2 * pages
    assert counts["outer"] <= 2 * pages


@pytest.fixture
def setting():
    saved = asc.settings.reuse_freed_memory
    yield
    asc.settings.reuse_freed_memory = saved


@glibc_only
def test_free_memory_goes_back_to_the_system_when_the_block_ends(fresh_process):
    # measured in the fresh process: in a test session other tests' freed (and still
    # resident) blocks may serve the allocations, and the RSS would not grow
    start, kept, returned = (fresh_process["rss"][k] for k in ("start", "kept", "returned"))
    assert kept - start >= 3 * BLOCK  # freed, but kept for reuse
    assert returned - start <= BLOCK


class _RecordingLibc:
    """Stands in for glibc: records the calls."""

    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_outermost_block_sets_and_restores_malloc(setting, monkeypatch):
    libc = _RecordingLibc()
    monkeypatch.setattr(_allocator, "_glibc", lambda: libc)
    with reuse_freed_memory() as active, reuse_freed_memory():
        assert active
        assert libc.calls == [("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]
    assert libc.calls[2:] == [
        ("mallopt", -4, 65536),
        ("mallopt", -1, 128 * 1024),
        ("malloc_trim", 0),
    ]
    assert _allocator._depth == 0
    libc.calls.clear()
    asc.settings.reuse_freed_memory = False
    with reuse_freed_memory() as active:
        assert not active
    assert libc.calls == []


def test_block_restores_malloc_when_the_step_fails(monkeypatch):
    libc = _RecordingLibc()
    monkeypatch.setattr(_allocator, "_glibc", lambda: libc)
    with pytest.raises(RuntimeError, match="boom"), reuse_freed_memory():
        raise RuntimeError("boom")
    assert libc.calls[-1] == ("malloc_trim", 0)
    assert _allocator._depth == 0


def test_decorator_runs_the_function_inside_the_block(setting):
    seen = []

    @reuses_freed_memory
    def step(x):
        """Doc."""
        seen.append(_allocator._depth)
        return x + 1

    assert step(1) == 2
    assert step.__doc__ == "Doc."
    assert seen == [1 if _allocator._glibc() is not None else 0]
    assert _allocator._depth == 0
    asc.settings.reuse_freed_memory = False
    step(1)
    assert seen[-1] == 0


def test_setting_must_be_a_bool(setting):
    with pytest.raises(TypeError, match="True or False"):
        asc.settings.reuse_freed_memory = "yes"
    assert "reuse_freed_memory=" in repr(asc.settings)
