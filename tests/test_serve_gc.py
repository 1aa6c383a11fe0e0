"""A service freezes what start-up made out of the cyclic garbage collector's reach
(shardmesh/serve.py _freeze_startup_objects): a full collection over the imported modules and the
model's objects takes tens of milliseconds on the event loop, in the middle of some decode step."""

import gc

from shardmesh import serve


def test_startup_objects_frozen_and_young_collections_rarer():
    threshold = gc.get_threshold()
    leftover = [[]]  # a live object that exists before the freeze
    leftover[0].append(leftover)  # (in a cycle: the collector tracks it)
    try:
        serve._freeze_startup_objects()
        assert gc.get_freeze_count() > 0
        assert not any(o is leftover for o in gc.get_objects())  # frozen: never walked again
        assert gc.get_threshold()[0] >= 10_000
        made = [[]]  # made after start-up: tracked and collected as ever
        made[0].append(made)
        assert any(o is made for o in gc.get_objects())
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
