"""Adapter-aware admission when adapter capacity binds (a --max-loras-per-batch cap, or rows):
the order in which waiting requests try to join, and which running adapters stop taking new
requests (drain) so that a starving one gets their place. Pure: no asyncio, no torch.

Rules (S-LoRA / SGLang-style adapter-aware batching, with a bounded wait):
1. Requests that cost no capacity join first: base requests and those of adapters already in the
   batch (the batch stays full with them), first come first served, starving ones first.
2. Then adapters with a starving request (one that waited `starvation_steps` plans), oldest
   first, for up to half the places (STARVING_SHARE of the cap, 8 when memory bounds it).
3. Then the other adapters not in the batch, one whole group of requests at a time, the adapter
   with the most waiting requests first (then the cheaper to bring in: resident before
   uploads; then the oldest waiter).
4. A running adapter leaves the batch only when its running requests have finished (never
   preempted for another adapter). While a starving request finds no place, one running
   adapter (the one that finishes soonest) *drains*: it admits no new request until it has
   left, and the starving adapter takes its place. Adapters with a starving request never drain.

Tuned with bench/many_sim.py (bench_many's capped run replayed through the real scheduler).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from collections.abc import Sequence as Seq
from typing import Final, Protocol

from lorasrv.engine.sequence import Sequence
from lorasrv.ids import AdapterId

#: Running adapters draining at once: each freed place goes to the oldest starving adapter, so
#: the wait stays bounded, while the rest of the batch keeps taking requests.
MAX_DRAINING: Final = 1
#: Share of the places that adapters with a starving request take before larger groups.
STARVING_SHARE: Final = 0.5
#: Places counted for that share when memory, not a cap, bounds the batch.
DEFAULT_PLACES: Final = 8


class Capacity(Protocol):
    """What admission asks of the step's adapter memory (batch_adapters.BatchAdapters)."""

    cap: int | None

    def cost(self, seq: Sequence) -> int: ...
    def place_rows(self, adapter_id: AdapterId) -> int: ...
    def obtainable_rows(self) -> int: ...


def admission_order(
    waiting: Iterable[Sequence], memory: Capacity, is_starving: Callable[[Sequence], bool]
) -> list[Sequence]:
    """Waiting requests in the order they try to join when capacity binds (rules 1-3)."""
    free: list[Sequence] = []
    groups: dict[AdapterId, list[Sequence]] = {}
    for seq in waiting:
        if seq.adapter_id is None or memory.cost(seq) == 0:
            free.append(seq)
        else:
            groups.setdefault(seq.adapter_id, []).append(seq)
    starving = sorted(
        (g for g in groups.values() if any(is_starving(s) for s in g)),
        key=lambda g: min(s.waiting_since_step for s in g),
    )[: starving_places(memory.cap)]
    first = {id(g) for g in starving}
    rest = sorted(
        (g for g in groups.values() if id(g) not in first),
        key=lambda g: (-len(g), memory.cost(g[0]), min(s.waiting_since_step for s in g)),
    )
    return (
        [s for s in free if is_starving(s)]
        + [s for group in starving for s in group]
        + [s for s in free if not is_starving(s)]
        + [s for group in rest for s in group]
    )


def starving_places(cap: int | None) -> int:
    """Adapters with a starving request that go before larger groups, per plan."""
    return max(1, int((cap or DEFAULT_PLACES) * STARVING_SHARE))


def choose_drains(
    blocked: Seq[Sequence],
    running: Iterable[Sequence],
    waiting: Iterable[Sequence],
    memory: Capacity,
    *,
    draining: Collection[AdapterId],
    is_starving: Callable[[Sequence], bool],
) -> frozenset[AdapterId]:
    """The running adapters that drain until the next admission (rule 4): while a starving
    request found no capacity (`blocked`), up to MAX_DRAINING of them, those already draining
    first, then the soonest finished (fewest waiting requests among equals). None otherwise:
    a drain no starving request needs any more ends at once."""
    by_adapter = _running_by_adapter(running)
    needed = [a for a in dict.fromkeys(s.adapter_id for s in blocked) if a not in by_adapter]
    if not needed:
        return frozenset()
    waiting = list(waiting)
    keep = {s.adapter_id for s in waiting if is_starving(s)}  # never drained
    wanted = Counter(s.adapter_id for s in waiting)
    candidates = sorted(
        (a for a in by_adapter if a not in keep),
        key=lambda a: (a not in draining, _drain_steps(by_adapter[a]), wanted[a], a),
    )
    places = 0 if memory.cap is None else len(by_adapter) + len(needed) - memory.cap
    ranks = {s.adapter_id: s.adapter_rank for s in blocked}
    rows = sum(ranks[a] for a in needed) - memory.obtainable_rows()
    chosen: list[AdapterId] = []
    for adapter_id in candidates[:MAX_DRAINING]:
        if places <= 0 and rows <= 0:
            break
        chosen.append(adapter_id)
        places, rows = places - 1, rows - memory.place_rows(adapter_id)
    return frozenset(chosen)


def _running_by_adapter(running: Iterable[Sequence]) -> Mapping[AdapterId, list[Sequence]]:
    out: dict[AdapterId, list[Sequence]] = {}
    for seq in running:
        if seq.adapter_id is not None:
            out.setdefault(seq.adapter_id, []).append(seq)
    return out


def _drain_steps(seqs: Iterable[Sequence]) -> int:
    """Steps until the last of `seqs` has finished, at most."""
    return max(_steps_left(seq) for seq in seqs)


def _steps_left(seq: Sequence) -> int:
    """Steps until `seq` finishes by length, at most (an unfinished prompt counts as one)."""
    return seq.params.max_new_tokens - len(seq.output_ids) + (seq.num_uncomputed > 1)
