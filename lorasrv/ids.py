"""Typed ids that cross actor queues: plain ints/strs at runtime, kept apart by mypy (NewType)."""

from __future__ import annotations

from typing import NewType

RequestId = NewType("RequestId", str)
SeqId = NewType("SeqId", int)
AdapterId = NewType("AdapterId", int)  # fresh at every load, never reused for another version
SlotId = NewType("SlotId", int)  # index into the stacked GPU LoRA buffers
BlockId = NewType("BlockId", int)  # one KV page
StepId = NewType("StepId", int)
OpId = NewType("OpId", int)  # one adapter admin operation (load/unload)
