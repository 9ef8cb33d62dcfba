"""Latency measurement, the per-layer latency model, rounding and the latency target."""

import json
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metaprune import zoo
from metaprune.errors import InvalidTargetError
from metaprune.latency.allocator import allocator_note
from metaprune.latency.layer_model import FRACTIONS, LayerTimes, measure_layer_times
from metaprune.latency.lock import measurement_lock
from metaprune.latency.timing import LatencyComparison, compare_latency
from metaprune.pruning.groups import minimum_kept, removal_neighbours, snap_removal
from metaprune.pruning.rounding import apply_round_to
from metaprune.vocabulary import check_round_to


@pytest.fixture(autouse=True)
def _short_measurements(monkeypatch):
    """Timing budgets of a second or less: these tests check behaviour, not speed."""
    from metaprune.pruning import latency_target

    monkeypatch.setattr(latency_target, "REPORT_BUDGET_S", 0.5)
    monkeypatch.setattr(latency_target, "_DENSE_BUDGET_S", 0.3)


def _tiny_resnet():
    torch.manual_seed(0)
    config = zoo.default_config("resnet", input_shape=(1, 8, 8), num_classes=10, depth=8,
                                stage_widths=[8, 16, 32], block_widths=[[8], [16], [32]])
    return zoo.build("resnet", config).eval(), (torch.randn(2, 1, 8, 8),)


def _hold_lock(queue, seconds):
    with measurement_lock():
        start = time.monotonic()
        time.sleep(seconds)
        queue.put((start, time.monotonic()))


def test_the_measurement_lock_serialises_processes():
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_hold_lock, args=(queue, 0.3)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    intervals = sorted(queue.get(timeout=5) for _ in workers)
    for (_, first_end), (second_start, _) in zip(intervals, intervals[1:]):
        assert second_start >= first_end


def test_a_waiting_measurement_says_so():
    heard = []
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    holder = context.Process(target=_hold_lock, args=(queue, 0.5))
    holder.start()
    time.sleep(0.2)  # let the holder take the lock first
    with measurement_lock(progress=heard.append):
        pass
    holder.join(timeout=30)
    assert any("waiting for another measurement" in line for line in heard)


def test_compare_latency_is_paired_restores_threads_and_modes():
    model, inputs = _tiny_resnet()
    model.train()
    torch.set_num_threads(2)
    comparison = compare_latency([model, model], inputs, batch=3, threads=1, budget_s=0.3,
                                 min_rounds=4, max_rounds=8)
    assert isinstance(comparison, LatencyComparison)
    assert torch.get_num_threads() == 2 and model.training
    assert 4 <= comparison.rounds <= 8 and all(len(s) == comparison.rounds
                                              for s in comparison.samples_ms)
    assert comparison.speedups[0] == 1.0 and comparison.batch == 3 and comparison.threads == 1
    low, high = comparison.quartiles_ms[1]
    assert 0 < low <= comparison.median_ms[1] <= high
    assert set(comparison.spread(1)) == {"before_ms", "after_ms", "speedup", "rounds", "clock",
                                         "allocator"}
    assert comparison.clock == "thread_cpu"  # one thread: time descheduled is not latency
    assert comparison.allocator == allocator_note()


# A forward pass's allocation pattern: several activations alive at once (8 x 10 MiB, each
# under the 32 MiB mmap threshold, 80 MiB in all: more than glibc's largest trim threshold,
# and one of 40 MiB, over any mmap threshold, as MobileNetV2's at batch 32), all freed at the
# end. Default glibc returns them to the system every pass (30,000 page faults per pass, for
# ever); inside `steady_allocator` only the first pass faults.
_ALLOCATION_PASSES = """
import contextlib, ctypes, importlib.util, json, resource, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
steady = contextlib.nullcontext()
if sys.argv[1] == "steady":
    spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    steady = module.steady_allocator()
faults = []
with steady:
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        sizes = [10 << 20] * 8 + [40 << 20]
        blocks = [libc.malloc(size) for size in sizes]
        for block, size in zip(blocks, sizes):
            ctypes.memset(block, 1, size)
        for block in blocks:
            libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


@pytest.mark.skipif(not Path("/proc/self").exists() or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc on Linux only")
def test_the_steady_allocator_stops_a_process_page_faulting_every_pass():
    from metaprune.latency import allocator

    def faults_per_pass(mode):
        done = subprocess.run([sys.executable, "-c", _ALLOCATION_PASSES, mode, allocator.__file__],
                              capture_output=True, text=True, check=True,
                              env={k: v for k, v in os.environ.items() if not k.startswith(
                                  ("MALLOC_", "LD_PRELOAD"))})
        return json.loads(done.stdout)

    default, steady = faults_per_pass("default"), faults_per_pass("steady")
    pages = (8 * (10 << 20) + (40 << 20)) // resource.getpagesize()
    assert min(default[1:]) > pages // 2  # the pages go back to the system and fault again
    assert max(steady[1:]) < pages // 20  # reused from the heap


def test_layer_tables_cover_the_prunable_layers_and_come_from_the_cache_the_second_time():
    model, inputs = _tiny_resnet()
    names = [n for n, _ in model.named_modules() if n]
    first = measure_layer_times(model, inputs, names, batch=1)
    assert "stem.conv" in first and "fc" in first
    assert all(t.times_ms and min(min(row) for row in t.times_ms) > 0 for t in first.values())
    heard = []
    second = measure_layer_times(model, inputs, names, batch=1, progress=heard.append)
    assert second == first and not heard  # nothing re-timed


def test_layer_tables_timed_under_another_allocator_setting_are_timed_again(monkeypatch):
    from metaprune.latency import layer_model

    model, inputs = _tiny_resnet()
    measure_layer_times(model, inputs, ["fc"], batch=1)
    cached = json.loads(Path(layer_model._cache_file()).read_text())
    monkeypatch.setattr(layer_model, "allocator_note", lambda: f"another allocator {time.time_ns()}")
    measure_layer_times(model, inputs, ["fc"], batch=1)
    recached = json.loads(Path(layer_model._cache_file()).read_text())
    assert len(recached) == len(cached) + 1  # timed again, under its own key


def test_layer_table_interpolates_between_grid_points():
    table = LayerTimes(tied=True, times_ms=[[f * 10 for f in FRACTIONS]])
    assert table.at(1.0, 1.0) == pytest.approx(10.0)
    assert table.at(0.6, 0.6) == pytest.approx(6.0)
    grid = LayerTimes(tied=False, times_ms=[[fi * fo for fo in FRACTIONS] for fi in FRACTIONS])
    assert grid.at(0.5, 0.75) == pytest.approx(0.375)


def test_removals_snap_to_kept_multiples():
    for size, step in ((20, 8), (64, 8), (16, 4), (10, 1)):
        limit = size - minimum_kept(size, step, 0.1)
        assert (size - limit) % step == 0 or size - limit == size
        for count in range(limit + 1):
            removed = snap_removal(count, size, step, limit)
            assert removed <= count and (removed == 0 or (size - removed) % step == 0)
            for neighbour in removal_neighbours(removed, size, step, limit):
                assert neighbour == 0 or (size - neighbour) % step == 0


@pytest.mark.parametrize("value", [0, -8, 2.5, "eight", True])
def test_bad_round_to_is_refused(value):
    with pytest.raises(InvalidTargetError, match="round_to"):
        check_round_to(value)


def _small_resnet():
    torch.manual_seed(0)
    config = zoo.default_config("resnet", input_shape=(3, 16, 16), num_classes=10, depth=8,
                                stage_widths=[16, 32, 64], block_widths=[[16], [32], [64]])
    return zoo.build("resnet", config).eval(), (torch.randn(1, 3, 16, 16),)


def _fake_measurement(dense_macs):
    """A deterministic stand-in for the clock: latency falls as MACs ** 0.7 (never as MACs)."""
    from metaprune.measure import count_macs

    def measure(dense, pruned, example_inputs, settings):
        ratio = (dense_macs / count_macs(pruned, example_inputs)) ** 0.7
        return LatencyComparison([10.0, 10.0 / ratio], [(9.0, 11.0), (9.0 / ratio, 11.0 / ratio)],
                                 [1.0, ratio], [(1.0, 1.0), (ratio, ratio)], settings.batch,
                                 settings.threads, "test CPU", 5, 0.0, [[10.0], [10.0 / ratio]])
    return measure


@pytest.mark.parametrize("allocation", ["global", "latency"])
def test_latency_target_is_reached_and_corrected_by_measurement(monkeypatch, allocation):
    from metaprune import prune
    from metaprune.measure import count_macs
    from metaprune.pruning import latency_target

    model, inputs = _small_resnet()
    monkeypatch.setattr(latency_target, "measure_report_latency",
                        _fake_measurement(count_macs(model, inputs)))
    report = prune(model, inputs, latency_speedup=1.6, allocation=allocation).report
    assert 0.95 * 1.6 <= report["latency_speedup"] <= 1.1 * 1.6
    assert report["target"]["reached"] and report["target"]["attempts"]
    assert report["latency_batch"] == 1 and report["latency_threads"] == 1
    assert report["cpu"] == "test CPU"


def test_round_to_keeps_multiples_for_every_target_kind():
    from metaprune import prune

    model, inputs = _small_resnet()
    for target in ({"speedup": 2.0}, {"params_ratio": 0.5}):
        result = prune(model, inputs, round_to=8, latency=False, **target)
        pruned_somewhere = False
        for name, (kept, total) in result.report["kept"].items():
            assert kept == total or kept % 8 == 0, (target, name, kept)
            pruned_somewhere |= kept < total
        assert pruned_somewhere
        note = result.report["target"]
        assert note is None or (not note["reached"] and "round_to" in note["why"])


def test_latency_allocation_meets_a_macs_target_and_reports_latency_keys():
    from metaprune import prune

    model, inputs = _small_resnet()
    report = prune(model, inputs, speedup=2.0, allocation="latency", latency_batch=2).report
    assert abs(report["speedup"] / 2.0 - 1) <= 0.02
    assert report["allocation"] == "latency" and report["latency_batch"] == 2
    assert report["latency_ms_before"] > 0 and report["latency_spread"]["rounds"] >= 3
    skipped = prune(model, inputs, speedup=2.0, latency=False).report
    assert skipped["latency_ms_before"] is None and skipped["latency_batch"] is None


def test_onnxruntime_latency_when_it_is_installed():
    pytest.importorskip("onnxruntime")
    from metaprune.latency.onnxruntime_timing import compare_onnxruntime

    model, inputs = _tiny_resnet()
    comparison = compare_onnxruntime([model, model], inputs, batch=2, budget_s=0.3)
    assert comparison.median_ms[0] > 0 and comparison.median_ms[1] > 0
    assert comparison.batch == 2 and comparison.rounds >= 3


def test_the_attempt_inside_the_window_is_kept_even_when_an_earlier_one_was_nearer():
    from metaprune.pruning import latency_target
    from metaprune.pruning.targets import Target

    # the first attempt (measured twice, being near) is nearer 2.0 in ratio, but outside
    # [1.9, 2.2]; the second is confirmed inside by its second measurement
    measured = iter([1.88, 1.88, 2.16, 2.16])

    class Allocation:
        groups = [None]
        high = 1.0

        def counts(self, theta):
            return [0]

    class Latency:
        def predict(self, counts):
            return 1.0

    def measure(pruned):
        ratio = next(measured)
        return LatencyComparison([1.0, 1 / ratio], [(1, 1), (1, 1)], [1.0, ratio],
                                 [(1, 1), (ratio, ratio)], 1, 1, "test CPU", 3, 0.0,
                                 [[1.0], [1 / ratio]])
    monkey_solve = latency_target.solve_counts
    latency_target.solve_counts = lambda *args, **kwargs: [0]
    try:
        pruned, comparison, note = latency_target.prune_to_latency(
            Allocation(), None, Latency(), Target("latency_speedup", 2.0), lambda c: object(),
            measure)
    finally:
        latency_target.solve_counts = monkey_solve
    assert note["reached"] and comparison.speedups[1] == 2.16


def _mlp_latency_model(layer_ms, out_fractions=FRACTIONS, multiple=None):
    """A 3-layer MLP's groups, cost model and a latency model built from hand-made tables:
    `layer_ms[name](keep_in, keep_out)` gives each layer's time at the grid points; with
    `multiple`, the groups keep multiples of it and the tables count as measured at each."""
    from metaprune.pruning.cost import CostModel
    from metaprune.pruning.graph_groups import plan_channel_groups
    from metaprune.pruning.latency_cost import LatencyModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                torch.nn.ReLU(), torch.nn.Linear(32, 4))
    inputs = (torch.randn(1, 16),)
    DG, groups = plan_channel_groups(model, inputs)
    if multiple:
        apply_round_to(groups, multiple)
    cost = CostModel(model, inputs, DG, groups)
    cost.set_orders([torch.arange(g.size) for g in groups])
    tables = {name: LayerTimes(False, [[time(f_in, f_out) for f_out in out_fractions]
                                       for f_in in FRACTIONS], 0, FRACTIONS, out_fractions)
              for name, time in layer_ms.items()}
    dense_ms = sum(time(1.0, 1.0) for time in layer_ms.values())
    return groups, LatencyModel(cost, tables, dense_ms, multiple)


def _first_removals(allocation, steps):
    """Which group index each of the first `steps` moves along the path took."""
    moves, previous = [], allocation.counts(0)
    for theta in range(1, steps + 1):
        counts = allocation.counts(theta)
        moves.append(next(i for i, (a, b) in enumerate(zip(previous, counts)) if a != b))
        previous = counts
    return moves


def test_time_weight_moves_the_latency_allocation_off_the_importance_order():
    from metaprune.pruning.latency_cost import latency_allocation

    # the first hidden layer is four times slower per MAC than the rest
    times = {"0": lambda i, o: 4.0 * i * o, "2": lambda i, o: 1.0 * i * o,
             "4": lambda i, o: 0.1 * i * o}
    groups, latency = _mlp_latency_model(times)
    slow, fast = (next(i for i, g in enumerate(groups) if g.root == root) for root in "02")
    # the importance order says: the fast layer's channels first
    keys = [torch.linspace(0.5, 1.5, g.size, dtype=torch.float64) for g in groups]
    keys[slow] = keys[slow] * 1.5
    by_importance = latency_allocation(groups, keys, latency, time_weight=0.0, thinning=False)
    assert _first_removals(by_importance, 4) == [fast] * 4
    by_time = latency_allocation(groups, keys, latency, time_weight=1.0, thinning=False)
    assert _first_removals(by_time, 4) == [slow] * 4


def test_a_step_in_a_layer_table_does_not_freeze_or_strip_that_layer():
    from metaprune.pruning.latency_cost import latency_allocation

    # the first hidden layer's time only drops below 3/4 of its width (a vector-width step):
    # removing its first channel alone saves nothing
    grid_points = (0.25, 0.5, 0.75, 0.875, 1.0)
    stepped = {"0": lambda i, o: 1.0 if o > 0.75 else 0.5 * o,
               "2": lambda i, o: 1.0 * i * o if i > 0.75 else 0.5 * i * o,
               "4": lambda i, o: 2.0 * i}
    groups, latency = _mlp_latency_model(stepped, out_fractions=grid_points)
    step, other = (next(i for i, g in enumerate(groups) if g.root == root) for root in "02")
    keys = [torch.linspace(0.5, 1.5, g.size, dtype=torch.float64) for g in groups]
    allocation = latency_allocation(groups, keys, latency)
    # the slope over the step prices its first chunks: it moves early ...
    assert step in _first_removals(allocation, 4)
    # ... and the other layer moves before it is stripped to its floor
    path = [allocation.counts(t) for t in range(int(allocation.high) + 1)]
    floor_reached = next(t for t, counts in enumerate(path)
                         if counts[step] == allocation.max_removed[step])
    assert any(counts[other] > 0 for counts in path[:floor_reached])


def test_with_round_to_a_chunk_that_saves_no_time_waits():
    from metaprune.pruning.latency_cost import latency_allocation

    # round_to=8 on 32-wide layers: the first hidden layer computes 16 outputs at a time, so
    # keeping 24 costs what 32 does (a CPU's vector-width step, measured at every multiple)
    multiples = (0.25, 0.5, 0.75, 1.0)
    times = {"0": lambda i, o: 1.0 if o > 0.5 else 0.5, "2": lambda i, o: 1.0 * o,
             "4": lambda i, o: 0.5 * i}
    groups, latency = _mlp_latency_model(times, out_fractions=multiples, multiple=8)
    step, other = (next(i for i, g in enumerate(groups) if g.root == root) for root in "02")
    keys = [torch.linspace(0.5, 1.5, g.size, dtype=torch.float64) for g in groups]
    allocation = latency_allocation(groups, keys, latency)
    path = [allocation.counts(t) for t in range(int(allocation.high) + 1)]
    assert all(count % 8 == 0 for counts in path for count in counts)
    # the stepped layer's first 8 channels (no time saved) go only once the other layer,
    # whose every chunk saves time, is at its floor
    first_step = next(t for t, counts in enumerate(path) if counts[step] > 0)
    assert path[first_step][other] == allocation.max_removed[other]
    # the slope over the step (the coarse-grid reading) would have moved it earlier
    latency.multiple = None
    smoothed = latency_allocation(groups, keys, latency)
    assert step in _first_removals(smoothed, 2)


def _fake_layer_times(monkeypatch, tmp_path):
    """Per-layer tables from a deterministic stand-in (time grows with kept in x out channels),
    cached apart: a tiny model's measured tables are mostly per-call overhead, and on a loaded
    machine they can predict too little speed-up for any target."""
    from metaprune.latency import layer_model

    def time_layer(module, shape, fraction_in, fraction_out, clock):
        kept_in, kept_out = layer_model._channel_counts(module)
        return 0.01 + 1e-4 * (layer_model._width(kept_in, fraction_in)
                              * layer_model._width(kept_out, fraction_out))

    monkeypatch.setattr(layer_model, "_time_layer", time_layer)
    monkeypatch.setattr(layer_model, "_cache_file", lambda: tmp_path / "layers.json")


def test_with_data_the_latency_allocation_is_chosen_by_training_loss(monkeypatch, tmp_path):
    from metaprune import prune
    from metaprune.data import load_dataset
    from metaprune.measure import count_macs
    from metaprune.pruning import latency_target
    from metaprune.pruning.latency_choice import CANDIDATES, fixed_batches

    model, inputs = _tiny_resnet()
    digits = load_dataset("digits")
    train, _test = digits.loaders(64, seed=3, train_subset=128)
    # reading the batches leaves the loader's shuffling where it was
    first = fixed_batches(train, 2)
    assert torch.equal(next(iter(train))[1], first[0][1])
    assert torch.equal(next(iter(digits.loaders(64, seed=3, train_subset=128)[0]))[1],
                       first[0][1])
    monkeypatch.setattr(latency_target, "measure_report_latency",
                        _fake_measurement(count_macs(model, inputs)))
    _fake_layer_times(monkeypatch, tmp_path)
    report = prune(model, inputs, latency_speedup=1.5, allocation="latency",
                   data=digits.loaders(64, seed=3, train_subset=128)).report
    choice = report["target"]["allocation_choice"]
    losses = [candidate["loss"] for candidate in choice["candidates"]]
    assert len(losses) == len(CANDIDATES) and choice["chosen"] == losses.index(min(losses))
    assert report["target"]["reached"] and report["allocation"] == "latency"
