"""A step's rows -> the StepPlan the runner gets. Pure: no asyncio, no torch; the scheduler's
sequences are updated (computed tokens, runner state) as the plan commits them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from lorasrv.engine.policy import Row
from lorasrv.engine.sequence import Sequence
from lorasrv.ids import SeqId, StepId
from lorasrv.messages import AdapterRows, NewSeq, StepPlan


def build_step_plan(
    step_id: StepId,
    rows: list[Row],
    adapters: tuple[AdapterRows, ...],
    uploads: tuple[AdapterRows, ...],
    freed: tuple[SeqId, ...],
    *,
    expect_next_decode: bool,
    context_length: int,
) -> StepPlan:
    """The plan of `rows`, sorted so each adapter is one run (base rows first, then in the order
    of `adapters`), registering new sequences with the runner; each row's tokens count as
    computed from here on."""
    index = {a.adapter_id: i for i, a in enumerate(adapters)}
    lora = [-1 if r.seq.adapter_id is None else index[r.seq.adapter_id] for r in rows]
    order = sorted(range(len(rows)), key=lora.__getitem__)  # stable: row order within a run
    rows = [rows[i] for i in order]
    new_seqs: list[NewSeq] = []
    input_ids: list[int] = []
    for row in rows:
        seq = row.seq
        if not seq.in_runner:
            seq.in_runner = True
            new_seqs.append(
                NewSeq(
                    seq_id=seq.seq_id,
                    params=seq.params,
                    prompt_ids=seq.prompt_ids,
                    output_ids=tuple(seq.output_ids),
                )
            )
        input_ids.extend(seq.token_slice(seq.num_computed, seq.num_computed + row.num_new))
    plan = StepPlan(
        step_id=step_id,
        new_seqs=tuple(new_seqs),
        freed_seq_ids=freed,
        seq_ids=tuple(r.seq.seq_id for r in rows),
        input_ids=tuple(input_ids),
        query_lens=tuple(r.num_new for r in rows),
        context_lens=tuple(r.seq.num_computed for r in rows),
        block_tables=tuple(tuple(r.seq.blocks) for r in rows),
        lora_adapters=tuple(lora[i] for i in order),
        adapters=adapters,
        uploads=uploads,
        sample_rows=tuple(r.is_sampled for r in rows),
        expect_next_decode=expect_next_decode,
        last_rows=tuple(r.is_sampled and _stops_by_length(r.seq, context_length) for r in rows),
    )
    for row in rows:
        row.seq.num_computed += row.num_new
    return plan


def has_prefill_work(
    rows: list[Row], running: Iterable[Sequence], waiting: Collection[Sequence]
) -> bool:
    """Requests waiting, or running ones with more than their next token to compute once `rows`
    have run: the step after a decode step will then likely be a prefill step."""
    stepping = {r.seq.seq_id: r.num_new for r in rows}
    return bool(waiting) or any(
        seq.num_uncomputed - stepping.get(seq.seq_id, 0) > 1 for seq in running
    )


def _stops_by_length(seq: Sequence, context_length: int) -> bool:
    """Its next token is its last by length (as `sequence.stop_reason` will find)."""
    return (
        len(seq.output_ids) + 1 >= seq.params.max_new_tokens or seq.num_tokens + 1 >= context_length
    )
