"""The executors' schedule (engine/in_flight.py): items yielded in plan order whatever order they finish in,
at most IN_FLIGHT computing, errors and early stops that let the running items finish first, and the torch
executor's thread split undone after a merge, even a failed one."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import souplm
from souplm import Recipe, SoupError
from souplm.engine import merged_tensors
from souplm.engine.in_flight import in_order


def test_yields_in_order_with_at_most_width_running_and_queues_ahead():
    running, peak, started = [0], [0], []
    lock = threading.Lock()

    def produce(i: int) -> int:
        with lock:
            started.append(i)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.03 if i % 3 == 0 else 0.001)  # every third item is slow: the later ones finish first
        with lock:
            running[0] -= 1
        return i * i

    assert list(in_order(12, produce, "t", width=2, ahead=4)) == [i * i for i in range(12)]
    assert peak[0] == 2 and sorted(started) == list(range(12))


def test_an_error_surfaces_in_order_after_the_running_items_finish():
    finished, release = [], threading.Event()

    def produce(i: int) -> int:
        if i == 1:
            raise ValueError("item 1 is bad")
        if i == 2:
            release.wait(5)
            time.sleep(0.05)
        finished.append(i)
        return i

    results = in_order(10, produce, "t", width=2, ahead=3)
    assert next(results) == 0
    release.set()
    with pytest.raises(ValueError, match="item 1 is bad"):
        next(results)
    # the generator's cleanup ran: item 2, running then, finished; items never started did not run
    assert 2 in finished and max(finished) <= 3


def test_closing_early_waits_for_running_items_and_starts_no_more():
    calls = []

    def produce(i: int) -> int:
        calls.append(i)
        time.sleep(0.02)
        return i

    results = in_order(50, produce, "t", width=2, ahead=4)
    assert next(results) == 0
    results.close()
    seen = list(calls)
    time.sleep(0.1)
    assert calls == seen and len(seen) <= 5  # nothing started after the close returned


@pytest.mark.parametrize("fail", [False, True])
def test_torch_executor_restores_torch_threads(family, tmp_path, monkeypatch, fail):
    before = torch.get_num_threads()
    recipe = Recipe.vanilla(family["a"], family["b"], 0.5)
    seen = []
    stream = merged_tensors(recipe)
    if fail:
        with pytest.raises(RuntimeError):
            for n, _ in enumerate(stream):
                seen.append(torch.get_num_threads())
                if n == 2:
                    raise RuntimeError("consumer fails")
        stream.close()
    else:
        for _ in stream:
            seen.append(torch.get_num_threads())
    assert seen and all(t == max(1, before // 2) for t in seen)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("executor", ["fused", "torch"])
def test_a_slow_item_does_not_reorder_the_output(family, tmp_path, monkeypatch, executor):
    # the second item's compute slowed: the ones queued behind it finish first; the file is the same
    from safetensors.torch import load_file

    from souplm.engine import execute_fused, execute_torch

    monkeypatch.setenv("SOUPLM_EXECUTOR", executor)
    recipe = Recipe.vanilla(family["a"], family["b"], 0.3)
    souplm.merge(recipe, tmp_path / "plain", progress=False)
    plan, _ = souplm.engine.prepare(recipe)
    slow = plan.items[1].out_name
    finished = []
    if executor == "torch":
        real = execute_torch._compute

        def compute(plan_, sources, item, *rest):
            if item.out_name == slow:
                time.sleep(0.3)
            out = real(plan_, sources, item, *rest)
            finished.append(item.out_name)
            return out

        monkeypatch.setattr(execute_torch, "_compute", compute)
    else:
        real = execute_fused.Executor.compute

        def compute(self, item, *rest):
            if item.out_name == slow:
                time.sleep(0.3)
            out = real(self, item, *rest)
            finished.append(item.out_name)
            return out

        monkeypatch.setattr(execute_fused.Executor, "compute", compute)
    souplm.merge(recipe, tmp_path / "slowed", progress=False)
    assert finished.index(slow) > 1  # it did finish after items behind it
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "slowed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (tmp_path / "slowed" / "model.safetensors").read_bytes()


def test_a_bad_input_is_still_one_clear_error_with_two_items_in_flight(family, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("SOUPLM_EXECUTOR", "torch")
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(family["b"] / "model.safetensors")
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text((family["b"] / "config.json").read_text())
    with pytest.raises(SoupError, match=name.replace(".", r"\.")):
        souplm.merge(Recipe.vanilla(family["a"], bad, 0.5), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", [None, "cpu"])
def test_on_a_device_one_item_computes_at_a_time(family, tmp_path, monkeypatch, device):
    # `--device cpu` takes the device's path (as CI runs the GPU one): the second item is read meanwhile,
    # but only one holds the device; on the host two compute at once
    from souplm.engine import execute_torch

    real, lock = execute_torch._compute, threading.Lock()
    running, peak = [0], [0]

    def compute(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(execute_torch, "_compute", compute)
    before = torch.get_num_threads()
    threads = []
    for _ in merged_tensors(Recipe.vanilla(family["a"], family["b"], 0.5), device=device):
        threads.append(torch.get_num_threads())
    assert peak[0] == (1 if device else 2)
    assert set(threads) == {before if device else max(1, before // 2)} and torch.get_num_threads() == before
