"""The last token each sequence sampled, kept on the device where the next step reads it.

Under the overlap schedule the scheduler plans step N+1 before step N's tokens reach the host:
the rows of N+1 that continue a sequence sampled in N are marked `device_inputs`, and their input
token comes from here. Every sampled row's token is written here as part of its step, so, steps
running in launch order on one stream, a later step always reads what an earlier one wrote.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from lorasrv.ids import SeqId
from lorasrv.messages import StepPlan
from lorasrv.model.sampler import upload

_MIN_SLOTS = 256


class DeviceTokens:
    """One int64 slot per live sequence (added with its NewSeq, freed with freed_seq_ids)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._table = torch.zeros(_MIN_SLOTS, dtype=torch.int64, device=device)  # [slots]
        self._free = list(reversed(range(_MIN_SLOTS)))
        self._slots: dict[SeqId, int] = {}
        self._sampled: set[SeqId] = set()  # sequences whose slot a launched step has written
        # The last index lists uploaded (a decode batch steps the same rows again and again).
        self._indexes: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}

    def add(self, seq_id: SeqId) -> None:
        """A slot for a new (or re-added) sequence; nothing sampled yet."""
        self.remove(seq_id)
        if not self._free:
            old = self._table.shape[0]
            # NOTE: queued on the stream like any step: it copies every write launched before it.
            self._table = torch.cat([self._table, self._table.new_zeros(old)])
            self._free = list(reversed(range(old, 2 * old)))
        self._slots[seq_id] = self._free.pop()

    def remove(self, seq_id: SeqId) -> None:
        slot = self._slots.pop(seq_id, None)
        if slot is not None:
            self._free.append(slot)
            self._sampled.discard(seq_id)

    def record(self, seq_ids: Sequence[SeqId], token_ids: torch.Tensor) -> None:
        """Queue the write of a step's sampled tokens (`token_ids` [n] on the device, row i for
        `seq_ids[i]`)."""
        index = self._index("record", [self._slots[seq_id] for seq_id in seq_ids])
        self._table.index_copy_(0, index, token_ids.to(torch.int64))
        self._sampled.update(seq_ids)

    def fill(self, input_ids: torch.Tensor, plan: StepPlan) -> None:
        """Write the plan's device inputs into its flat input tokens `input_ids` [num_tokens] (any
        integer dtype, on the device), in place; nothing when it has none."""
        if not any(plan.device_inputs):
            return
        starts = itertools.accumulate(plan.query_lens, initial=0)
        positions: list[int] = []
        slots: list[int] = []
        rows = zip(plan.seq_ids, plan.device_inputs, plan.query_lens, starts, strict=False)
        for seq_id, is_device, query_len, start in rows:
            if not is_device:
                continue
            if query_len != 1 or seq_id not in self._sampled:
                raise ValueError(
                    f"plan {plan.step_id}: seq {seq_id} reads a device input, but no step "
                    "launched since it was added sampled a token for it (or its row is not one "
                    "token)"
                )
            positions.append(start)
            slots.append(self._slots[seq_id])
        index = self._index("fill", positions + slots).view(2, -1)
        tokens = self._table.index_select(0, index[1]).to(input_ids.dtype)  # [num_device]
        input_ids.index_copy_(0, index[0], tokens)

    def _index(self, use: str, values: list[int]) -> torch.Tensor:
        """`values` as an int64 device tensor; the previous one of this use when equal (no
        upload: steps of one decode batch name the same rows)."""
        key = tuple(values)
        cached = self._indexes.get(use)
        if cached is not None and cached[0] == key:
            return cached[1]
        index = upload(torch.tensor(values, dtype=torch.int64), self.device)
        self._indexes[use] = (key, index)
        return index
