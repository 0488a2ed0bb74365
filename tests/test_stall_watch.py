"""real/stall_watch.py: garbage collections timed while serving, for run.json (pure Python; no GPU)."""
from __future__ import annotations

import gc

from real.stall_watch import StallWatch, freeze_startup_heap


def test_collections_are_counted_timed_and_listed_when_long():
    clock = iter(range(100, 200))
    watch = StallWatch(clock=lambda: next(clock), long_ms=0.0).start()  # every pause "long": each one listed
    junk = [[i] for i in range(20000)]
    gc.collect(2)
    gc.collect(0)
    got = watch.stop()
    del junk
    g = got["gc"]
    assert g["collections_by_generation"][2] >= 1 and g["collections_by_generation"][0] >= 1
    assert len(g["long_pauses"]) == sum(g["collections_by_generation"])
    assert [p[0] for p in g["long_pauses"]][:2] == [100, 101]  # the run's clock at each pause's end
    assert 0 < g["longest_ms"] <= g["total_ms"]
    assert got["cuda_allocator"] == {}  # no CUDA device watched


def test_stop_unhooks_and_short_pauses_are_only_counted():
    watch = StallWatch(long_ms=1e6).start()
    gc.collect()
    got = watch.stop()
    assert watch._on_gc not in gc.callbacks
    assert got["gc"]["long_pauses"] == [] and sum(got["gc"]["collections_by_generation"]) >= 1
    before = list(watch.collections)
    gc.collect()
    assert watch.collections == before  # no longer watching


def test_freezing_the_startup_heap_keeps_it_out_of_later_collections():
    class Node:
        pass

    alive = Node()
    alive.me = alive  # a cycle: tracked by the collector, walked by every full collection until frozen
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        assert not any(o is alive for o in gc.get_objects())  # no generation holds it: full collections skip it
        made_later = Node()
        made_later.me = made_later
        assert any(o is made_later for o in gc.get_objects())  # what serving makes is still collected
    finally:
        gc.unfreeze()
    assert any(o is alive for o in gc.get_objects())
