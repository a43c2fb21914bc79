"""`core.base.memory.settle_heap`: cyclic garbage is collected, survivors are frozen, and
garbage made of frozen objects is collected by the next call (nothing piles up)."""

from __future__ import annotations

import gc
import weakref

import pytest

from core.base.memory import settle_heap


class _Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def _thaw():
    yield
    gc.unfreeze()


def test_settle_collects_garbage_and_freezes_the_survivors():
    dead = weakref.ref(_Node())
    alive = _Node()
    gc.disable()  # no automatic pass may collect the cycle before the call
    try:
        assert dead() is not None
        settle_heap()
        assert dead() is None
        assert gc.get_freeze_count() > 0
        # frozen: a full pass no longer walks it, so it is not among the collected objects
        assert not any(o is alive for o in gc.get_objects(generation=2))
    finally:
        gc.enable()


def test_a_frozen_cycle_dropped_later_is_collected_by_the_next_call():
    node = _Node()
    ref = weakref.ref(node)
    gc.disable()
    try:
        settle_heap()
        del node
        gc.collect()  # a full pass skips frozen objects: the cycle stays
        assert ref() is not None
        settle_heap()
        assert ref() is None
    finally:
        gc.enable()
