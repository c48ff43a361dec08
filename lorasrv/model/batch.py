"""Host-side step preparation: StepPlan -> attention and sampling tensors in one packed int32
upload (the LoRA backend builds the step's LoRA metadata itself).

Vectorized over rows (CPU tensor ops, no per-row Python loops over tensors); never runs the model.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from lorasrv.ids import SeqId
from lorasrv.messages import StepPlan
from lorasrv.model.attention import AttentionMetadata, prepare_attention_metadata


class StepBatch(NamedTuple):
    input_ids: torch.Tensor  # [num_tokens] int32
    metadata: AttentionMetadata
    sample_index: torch.Tensor  # [num_sampled] int64, token index of each sampled row's last token
    sampled_seq_ids: list[SeqId]


class StepPreparer:
    """Builds StepBatches; keeps one pinned staging buffer so uploads need no fresh pinning."""

    def __init__(
        self, *, page_size: int, num_pages: int, device: torch.device, dense_metadata: bool = True
    ) -> None:
        self.page_size = page_size
        self.num_pages = num_pages
        self.device = device
        self.dense_metadata = dense_metadata  # the reference attention's gather indices
        self._staging = torch.empty(0, dtype=torch.int32)
        self._upload_done: torch.cuda.Event | None = None  # the last copy out of _staging

    def prepare(self, plan: StepPlan, page_limit: int | None = None) -> StepBatch:
        """`page_limit`: the lowest page under the LoRA rows this plan names (its pages must lie
        below it); None without LoRA rows."""
        num_rows = len(plan.seq_ids)
        num_tokens = len(plan.input_ids)
        query_lens = torch.tensor(plan.query_lens, dtype=torch.int32)  # [R]
        context_lens = torch.tensor(plan.context_lens, dtype=torch.int32)  # [R]
        assert int(query_lens.sum()) == num_tokens, "input_ids must hold every row's new tokens"
        max_query_len = max(plan.query_lens)
        kv_lens = query_lens + context_lens  # [R]
        max_kv_len = int(kv_lens.max())
        num_cols = -(-max_kv_len // self.page_size)
        tables = _pad_block_tables(
            plan, num_cols, kv_lens, self.page_size, self.num_pages, page_limit
        )

        cu_query = torch.zeros(num_rows + 1, dtype=torch.int32)
        torch.cumsum(query_lens, 0, out=cu_query[1:])
        sampled = torch.tensor(plan.sample_rows, dtype=torch.bool)  # [R]
        sample_index = cu_query[1:][sampled] - 1  # [S]
        parts = [torch.tensor(plan.input_ids, dtype=torch.int32), query_lens, context_lens]
        parts += [sample_index, tables.view(-1), cu_query, kv_lens]
        views = self._upload(parts)
        metadata = prepare_attention_metadata(
            views[1],
            views[2],
            views[4].view(num_rows, -1),
            views[5],
            views[6],
            num_tokens=num_tokens,
            max_query_len=max_query_len,
            max_kv_len=max_kv_len,
            page_size=self.page_size,
            dense=self.dense_metadata,
        )
        return StepBatch(
            input_ids=views[0],
            metadata=metadata,
            sample_index=views[3].long(),
            sampled_seq_ids=list(itertools.compress(plan.seq_ids, plan.sample_rows)),
        )

    def _upload(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Concatenate on the host, copy once, split into device views."""
        sizes = [p.numel() for p in parts]
        total = sum(sizes)
        if self.device.type != "cuda":
            return list(torch.cat(parts).split_with_sizes(sizes))
        if self._upload_done is not None:
            # NOTE: the previous step's copy may still be reading the staging buffer (a step that
            # samples nothing never syncs); wait for it before overwriting.
            self._upload_done.synchronize()
        if self._staging.numel() < total:
            self._staging = torch.empty(
                max(total, 2 * self._staging.numel()), dtype=torch.int32, pin_memory=True
            )
        torch.cat(parts, out=self._staging[:total])
        device_packed = self._staging[:total].to(self.device, non_blocking=True)
        self._upload_done = torch.cuda.current_stream(self.device).record_event()
        return list(device_packed.split_with_sizes(sizes))


def _pad_block_tables(
    plan: StepPlan,
    num_cols: int,
    kv_lens: torch.Tensor,
    page_size: int,
    num_pages: int,
    page_limit: int | None,
) -> torch.Tensor:
    """`[num_rows, num_cols]` int32, each row's pages then zeros (masked out, never read).

    Checks the scheduler's tables on the host: an out-of-range page would be a device fault.
    """
    num_rows = len(plan.block_tables)
    lens = torch.tensor([len(t) for t in plan.block_tables], dtype=torch.int64)  # [R]
    flat = torch.tensor(list(itertools.chain.from_iterable(plan.block_tables)), dtype=torch.int32)
    if bool((lens * page_size < kv_lens).any()):
        raise ValueError("a block table does not cover its row's context + new tokens")
    if flat.numel():
        check_pages(int(flat.min()), int(flat.max()), num_pages, page_limit)
    row = torch.repeat_interleave(torch.arange(num_rows), lens)  # [total_pages]
    col = torch.arange(flat.numel()) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    keep = col < num_cols  # tables may hold pages past this step's tokens
    tables = torch.zeros(num_rows, num_cols, dtype=torch.int32)
    tables[row[keep], col[keep]] = flat[keep]
    return tables


def check_pages(low: int, high: int, num_pages: int, page_limit: int | None) -> None:
    """The host check of a step's pages (`low`, `high`: the smallest and largest it uses): a page
    outside the arena would be a device fault, one under the step's LoRA rows (`page_limit`, the
    lowest page they cover) would overwrite an adapter."""
    if not 0 <= low <= high < num_pages:
        raise ValueError(f"block table page id outside [0, {num_pages})")
    if page_limit is not None and high >= page_limit:
        raise ValueError(
            f"block table page {high} lies under LoRA rows of this step's adapters (their rows "
            f"start in page {page_limit}): a page holds KV only while no allocated row covers it"
        )
