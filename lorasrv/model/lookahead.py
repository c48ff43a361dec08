"""Lookahead decode: the step after a decode step, planned here as if every row went on, and the
check that the scheduler's real plan is that step. Pure plan logic; the runner launches guesses.
"""

from __future__ import annotations

from typing import NamedTuple

from lorasrv.ids import StepId
from lorasrv.messages import AdapterRows, StepPlan
from lorasrv.model.pending_sample import PendingSample

# While the scheduler turns step N's tokens into step N+1's plan, the GPU already runs the step
# N+1 would be if every row went on (except rows the plan marks as stopping by length), fed N's
# sampled tokens from the device. Equal plans: its tokens are already on their way; different
# ones: the guess is dropped.
# NOTE: a dropped guess must leave nothing behind. It wrote K/V one position past each row's
# context, in a page the row already holds (the scheduler reserves one page ahead; rows without
# one are never guessed): a row that goes on rewrites that position from the same input, and a
# page of a row that stopped is rewritten by its next owner before anything reads it, since steps
# run in launch order. Sampler state must not move: rows with penalty history or their own seed
# are never guessed (runner.py, Sampler.is_replayable).


class Guess(NamedTuple):
    plan: StepPlan  # what ran: input_ids are placeholders, the real ones are parent's tokens
    keep: tuple[int, ...]  # the parent's rows it continues (rows known to stop are left out)
    parent: PendingSample  # the step whose sampled tokens were its inputs
    pending: PendingSample  # its own sampled tokens


def next_decode_plan(
    plan: StepPlan, page_size: int, context_length: int
) -> tuple[StepPlan, tuple[int, ...]] | None:
    """The step after `plan` if every row not known to stop decodes one more token, with the
    indices of those rows in `plan`; None when `plan` is not a pure decode step, no row goes on,
    or a row has no page (or no context left) for its next token."""
    if plan.new_seqs or not plan.is_decode:
        return None
    last = plan.last_rows or (False,) * len(plan.seq_ids)
    keep = tuple(i for i, stops in enumerate(last) if not stops)
    if not keep:
        return None
    next_lens = tuple(plan.context_lens[i] + 1 for i in keep)
    tables = tuple(plan.block_tables[i] for i in keep)
    for table, ctx in zip(tables, next_lens, strict=True):
        if ctx // page_size >= len(table) or ctx + 1 >= context_length:
            return None
    guess = StepPlan(
        step_id=StepId(plan.step_id + 1),
        seq_ids=tuple(plan.seq_ids[i] for i in keep),
        input_ids=(0,) * len(keep),
        query_lens=(1,) * len(keep),
        context_lens=next_lens,
        block_tables=tables,
        lora_adapters=tuple(plan.lora_adapters[i] for i in keep),
        adapters=plan.adapters,  # the same rows; entries no kept row uses are harmless
        sample_rows=(True,) * len(keep),
    )
    return guess, keep


def row_adapters(plan: StepPlan) -> tuple[AdapterRows | None, ...]:
    """Each row's adapter and its rows (None = base): what its LoRA delta was computed from."""
    return tuple(plan.adapters[i] if i >= 0 else None for i in plan.lora_adapters)


def guess_holds(guess: Guess, plan: StepPlan, page_size: int) -> bool:
    """Whether `plan` is exactly the step `guess` ran (rows, positions, pages, adapters and
    their rows, inputs). A plan with uploads never is: the guess ran before them."""
    ran = guess.plan
    if (
        plan.new_seqs
        or plan.uploads
        or plan.seq_ids != ran.seq_ids
        or plan.query_lens != ran.query_lens
        or plan.context_lens != ran.context_lens
        or plan.sample_rows != ran.sample_rows
        or row_adapters(plan) != row_adapters(ran)
    ):
        return False
    for new, old, ctx in zip(plan.block_tables, ran.block_tables, ran.context_lens, strict=True):
        used = ctx // page_size + 1  # the pages the step read and wrote
        if tuple(new[:used]) != tuple(old[:used]):
            return False
    tokens = guess.parent.result().token_ids
    return tuple(plan.input_ids) == tuple(tokens[i] for i in guess.keep)
