"""A step's rows -> the StepPlan the runner gets. Pure: no asyncio, no torch; the scheduler's
sequences are updated (computed and pending tokens, runner state) as the plan commits them.
"""

from __future__ import annotations

from lorasrv.engine.policy import Row
from lorasrv.ids import SeqId, StepId
from lorasrv.messages import AdapterRows, NewSeq, StepPlan


def build_step_plan(
    step_id: StepId,
    rows: list[Row],
    adapters: tuple[AdapterRows, ...],
    uploads: tuple[AdapterRows, ...],
    freed: tuple[SeqId, ...],
) -> StepPlan:
    """The plan of `rows`, sorted so each adapter is one run (base rows first, then in the order
    of `adapters`), registering new sequences with the runner; each row's tokens count as
    computed from here on, and each sampled row's token as pending. A row whose token is still
    pending (sampled by a step in flight) reads it on the device (`device_inputs`)."""
    index = {a.adapter_id: i for i, a in enumerate(adapters)}
    lora = [-1 if r.seq.adapter_id is None else index[r.seq.adapter_id] for r in rows]
    order = sorted(range(len(rows)), key=lora.__getitem__)  # stable: row order within a run
    rows = [rows[i] for i in order]
    new_seqs: list[NewSeq] = []
    input_ids: list[int] = []
    device_inputs: list[bool] = []
    for row in rows:
        seq = row.seq
        if not seq.in_runner:
            assert not seq.num_pending, f"{seq.request_id}: re-added with tokens in flight"
            seq.in_runner = True
            new_seqs.append(
                NewSeq(
                    seq_id=seq.seq_id,
                    params=seq.params,
                    prompt_ids=seq.prompt_ids,
                    output_ids=tuple(seq.output_ids),
                )
            )
        device_inputs.append(seq.num_pending > 0)
        if seq.num_pending:
            # NOTE: its only uncomputed token is the one a step in flight samples.
            assert row.num_new == 1, f"{seq.request_id}: {row.num_new} tokens, one pending"
            input_ids.append(0)
        else:
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
        device_inputs=tuple(device_inputs) if any(device_inputs) else (),
    )
    for row in rows:
        row.seq.num_pending += row.is_sampled  # before num_computed moves: is_sampled reads it
        row.seq.num_computed += row.num_new
    return plan
