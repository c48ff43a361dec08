"""Token sampling for one step: penalties, greedy/temperature/top-k/top-p/min-p, seeds, logprobs.

Owns per-seq sampling state (params, penalty counts, generators); must not touch the KV cache
or the model, and must not sync the device before `PendingSample.result()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lorasrv.ids import SeqId
from lorasrv.messages import NewSeq, StepResult
from lorasrv.model.pending_sample import PendingSample
from lorasrv.model.sampling_ops import (
    apply_penalties,
    apply_top_k_top_p,
    draw_seed,
    make_generator,
)

# Below this a temperature is greedy: dividing float32 logits by it would overflow (vLLM's value).
GREEDY_TEMPERATURE = 1e-5
_MIN_PENALTY_SLOTS = 8


@dataclass(slots=True)
class _SeqState:
    """What one seq needs at every step; params are frozen, so this is built once at add_seq."""

    is_greedy: bool
    sample_row: tuple[float, float, float, float]  # temperature, top_k, top_p, min_p
    penalty_row: tuple[float, float, float]  # repetition, frequency, presence
    penalty_slot: int  # row of the count tables; -1 = no penalties, no history kept
    seed: int | None  # own noise stream (params.seed) for a row that draws; None: the shared one
    num_drawn: int  # tokens sampled for it so far (its outputs at add_seq included)
    wants_logprobs: bool
    num_top_logprobs: int


class _Batch(NamedTuple):
    """Host-built description of one step; index lists are row numbers into the logits."""

    sampled_rows: list[int]  # rows that are not greedy
    sample_params: torch.Tensor | None  # [num_sampled, 4] like _SeqState.sample_row
    seeded: list[tuple[int, int]]  # (index into sampled_rows, seed of this draw)
    unseeded: list[int]  # indices into sampled_rows that draw from the shared generator
    uses_top_k_top_p: bool
    uses_min_p: bool
    penalty_rows: list[int]
    penalty_slots: list[int]
    penalty_params: torch.Tensor | None  # [num_penalty_rows, 3] like _SeqState.penalty_row


class Sampler:
    """Per-seq sampling state plus the batched `sample` step.

    Penalty counts: seqs with any penalty get a slot in two device tables, `_counts` [slots,
    vocab] int32 (output occurrences) and `_prompt_mask` [slots, vocab] bool, filled once at
    add_seq. Each step gathers the batch's slots with one index_select and adds the sampled
    tokens with one index_put_, so the per-step cost is O(rows * vocab) with no host transfer of
    histories; memory is 5 bytes * vocab per penalized seq (the table doubles when full).
    Seqs without penalties keep no history: their params are frozen, so they never need it.

    Seeds: a seeded seq draws only its own noise row, from a generator seeded with
    `draw_seed(seed, k)` for its k-th generated token, so its tokens depend on its seed, their
    position and the logits alone: not on the batch, and not on a preemption (re-added with its
    outputs so far, it goes on from the next position). Unseeded rows share `seed`'s generator,
    or torch's default generator of `device` when `seed` is None.
    """

    def __init__(self, vocab_size: int, device: torch.device, *, seed: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._seqs: dict[SeqId, _SeqState] = {}
        self._shared_generator: torch.Generator | None = None
        if seed is not None:
            self._shared_generator = make_generator(seed, device)
        self._seeded_generator = torch.Generator(device=device)  # reseeded for every draw
        self._counts = torch.zeros((0, vocab_size), dtype=torch.int32, device=device)
        self._prompt_mask = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)
        self._free_slots: list[int] = []

    def add_seq(self, seq: NewSeq) -> None:
        """Registers a seq (replacing one with the same id) with its prompt and output so far."""
        self.remove_seq(seq.seq_id)
        params = seq.params
        top_k = params.top_k if 0 < params.top_k < self.vocab_size else self.vocab_size
        is_greedy = params.temperature < GREEDY_TEMPERATURE or top_k == 1
        penalty_row = (
            params.repetition_penalty,
            params.frequency_penalty,
            params.presence_penalty,
        )
        slot = self._prepare_penalty_slot(seq) if penalty_row != (1.0, 0.0, 0.0) else -1
        self._seqs[seq.seq_id] = _SeqState(
            is_greedy=is_greedy,
            sample_row=(
                max(params.temperature, GREEDY_TEMPERATURE),
                float(top_k),
                params.top_p if params.top_p < 1.0 else float("inf"),
                params.min_p,
            ),
            penalty_row=penalty_row,
            penalty_slot=slot,
            seed=params.seed if not is_greedy else None,
            num_drawn=len(seq.output_ids),
            wants_logprobs=params.logprobs or params.top_logprobs > 0,
            num_top_logprobs=params.top_logprobs,
        )

    def remove_seq(self, seq_id: SeqId) -> None:
        """Drops a seq's state; unknown ids are ignored."""
        state = self._seqs.pop(seq_id, None)
        if state is not None and state.penalty_slot >= 0:
            self._free_slots.append(state.penalty_slot)

    def sample(self, logits: torch.Tensor, seq_ids: Sequence[SeqId]) -> StepResult:
        """One token per row of `logits` [n, vocab] float32, row i belonging to seq_ids[i].

        Appends each chosen token to its seq's history (penalty counts), so the next step's
        penalties see it. `logits` is not modified.
        """
        return self.sample_async(logits, seq_ids).result()

    def is_plain_greedy(self, seq_ids: Sequence[SeqId]) -> bool:
        """Whether a step's tokens are the raw logits' argmax and nothing else is asked: every row
        greedy, without penalties (they would change the logits) and without logprobs. Such a
        step needs no full row of logits (TP takes a vocab-parallel argmax)."""
        for seq_id in seq_ids:
            state = self._seqs[seq_id]
            if not state.is_greedy or state.penalty_slot >= 0 or state.wants_logprobs:
                return False
        return True

    def sample_async(self, logits: torch.Tensor, seq_ids: Sequence[SeqId]) -> PendingSample:
        """`sample` with every device op queued now and the host copy still pending; all reads of
        `logits` are queued before this returns, so the caller may reuse its buffer."""
        states = [self._seqs[seq_id] for seq_id in seq_ids]
        batch = self._prepare_batch(states)
        for state in states:
            state.num_drawn += 1
        penalized = logits
        if batch.penalty_params is not None:
            penalized = self._penalize(logits, batch)
        token_ids = self._choose(penalized, batch)  # [n] int64
        if batch.penalty_slots:
            rows = self._ids_tensor(batch.penalty_rows)
            self._add_counts(batch.penalty_slots, token_ids.index_select(0, rows))
        return self._result(logits, token_ids, states)

    # ------------------------------------------------------------------------- step stages

    def _prepare_batch(self, states: list[_SeqState]) -> _Batch:
        sampled_rows: list[int] = []
        sample_rows: list[tuple[float, float, float, float]] = []
        seeded: list[tuple[int, int]] = []
        unseeded: list[int] = []
        penalty_rows: list[int] = []
        penalty_slots: list[int] = []
        for row, state in enumerate(states):
            if state.penalty_slot >= 0:
                penalty_rows.append(row)
                penalty_slots.append(state.penalty_slot)
            if not state.is_greedy:
                if state.seed is not None:
                    seeded.append((len(sampled_rows), draw_seed(state.seed, state.num_drawn)))
                else:
                    unseeded.append(len(sampled_rows))
                sampled_rows.append(row)
                sample_rows.append(state.sample_row)
        penalty_table = [states[row].penalty_row for row in penalty_rows]
        return _Batch(
            sampled_rows=sampled_rows,
            sample_params=self._params_tensor(sample_rows),
            seeded=seeded,
            unseeded=unseeded,
            uses_top_k_top_p=any(
                r[1] < self.vocab_size or r[2] != float("inf") for r in sample_rows
            ),
            uses_min_p=any(r[3] > 0.0 for r in sample_rows),
            penalty_rows=penalty_rows,
            penalty_slots=penalty_slots,
            penalty_params=self._params_tensor(penalty_table),
        )

    def _penalize(self, logits: torch.Tensor, batch: _Batch) -> torch.Tensor:
        assert batch.penalty_params is not None
        rows = self._ids_tensor(batch.penalty_rows)
        slots = self._ids_tensor(batch.penalty_slots)
        penalized = apply_penalties(
            logits.index_select(0, rows),  # [num_penalty_rows, vocab]
            self._counts.index_select(0, slots),
            self._prompt_mask.index_select(0, slots),
            batch.penalty_params,
        )
        return logits.index_copy(0, rows, penalized)  # [n, vocab]

    def _choose(self, logits: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """Greedy rows take the argmax; the others go through _draw. Returns [n] int64."""
        num_rows = logits.shape[0]
        if batch.sample_params is None:
            return logits.argmax(dim=-1)
        if len(batch.sampled_rows) == num_rows:
            return self._draw(logits, batch)
        token_ids = logits.argmax(dim=-1)  # [n]
        rows = self._ids_tensor(batch.sampled_rows)
        drawn = self._draw(logits.index_select(0, rows), batch)
        return token_ids.index_copy(0, rows, drawn)

    def _draw(self, logits: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """Temperature, top-k/top-p, min-p, then the exponential race on `logits` [m, vocab]."""
        params = batch.sample_params
        assert params is not None
        logits = logits / params[:, 0:1]  # [m, vocab]
        if batch.uses_top_k_top_p:
            logits = apply_top_k_top_p(logits, params[:, 1], params[:, 2])
        probs = logits.softmax(dim=-1)  # [m, vocab]
        if batch.uses_min_p:
            # Relative to the max, so the same before or after top-k/top-p renormalization.
            too_rare = probs < params[:, 3:4] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(too_rare, 0.0)
        # argmax(p / E) with E ~ Exponential(1) picks index i with probability p_i / sum(p),
        # so probs need no renormalization after masking.
        noise = self._noise(probs, batch)
        return (probs / noise).argmax(dim=-1)

    def _noise(self, probs: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """Exponential(1) noise like `probs` [m, vocab]; seeded rows from their own generator."""
        noise = torch.empty_like(probs)  # [m, vocab]
        if not batch.seeded:
            noise.exponential_(generator=self._shared_generator)
        else:
            if batch.unseeded:
                shared = probs.new_empty((len(batch.unseeded), probs.shape[1]))
                shared.exponential_(generator=self._shared_generator)
                noise.index_copy_(0, self._ids_tensor(batch.unseeded), shared)
            # NOTE: one draw of exactly `vocab` values per seeded row from a generator seeded for
            # this token, independent of the batch; changing this changes seeded requests' tokens.
            generator = self._seeded_generator
            for index, seed in batch.seeded:
                generator.manual_seed(seed)
                noise[index].exponential_(generator=generator)
        # An exact 0 would turn a zero-probability token into 0/0 = nan, which argmax may pick.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _result(
        self, raw_logits: torch.Tensor, token_ids: torch.Tensor, states: list[_SeqState]
    ) -> PendingSample:
        num_rows = len(states)
        if not any(state.wants_logprobs for state in states):
            return PendingSample(token_ids, [], [], [], num_rows)
        logprobs = raw_logits.log_softmax(dim=-1)  # [n, vocab]
        chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)  # [n]
        top_rows = [row for row, state in enumerate(states) if state.num_top_logprobs > 0]
        if not top_rows:
            return PendingSample(token_ids, [chosen], [], [], num_rows)
        max_top = max(states[row].num_top_logprobs for row in top_rows)
        top_values, top_ids = logprobs.index_select(0, self._ids_tensor(top_rows)).topk(
            min(max_top, self.vocab_size), dim=-1
        )  # [num_top_rows, max_top]
        top_ks = [states[row].num_top_logprobs for row in top_rows]
        return PendingSample(token_ids, [chosen, top_values, top_ids], top_rows, top_ks, num_rows)

    # ------------------------------------------------------------------------- helpers

    def _take_slot(self) -> int:
        """A zeroed row of the penalty tables, doubling them when none is free."""
        if not self._free_slots:
            old = self._counts.shape[0]
            new = max(_MIN_PENALTY_SLOTS, 2 * old)
            self._counts = torch.cat(
                [self._counts, self._counts.new_zeros(new - old, self.vocab_size)]
            )
            self._prompt_mask = torch.cat(
                [self._prompt_mask, self._prompt_mask.new_zeros(new - old, self.vocab_size)]
            )
            # Reversed so that pop() hands out low slots first.
            self._free_slots.extend(reversed(range(old, new)))
        slot = self._free_slots.pop()
        self._counts[slot].zero_()
        self._prompt_mask[slot].zero_()
        return slot

    def _prepare_penalty_slot(self, seq: NewSeq) -> int:
        slot = self._take_slot()
        if seq.params.repetition_penalty != 1.0 and seq.prompt_ids:
            self._prompt_mask[slot, self._ids_tensor(seq.prompt_ids)] = True
        if seq.output_ids:
            self._add_counts([slot] * len(seq.output_ids), self._ids_tensor(seq.output_ids))
        return slot

    def _add_counts(self, slots: list[int], token_ids: torch.Tensor) -> None:
        """counts[slots[i], token_ids[i]] += 1; accumulate, since a slot may repeat."""
        ones = torch.ones_like(token_ids, dtype=torch.int32)  # [len(slots)]
        self._counts.index_put_((self._ids_tensor(slots), token_ids), ones, accumulate=True)

    def _ids_tensor(self, ids: Sequence[int]) -> torch.Tensor:
        return upload(torch.tensor(ids, dtype=torch.int64), self.device)

    def _params_tensor(self, rows: Sequence[tuple[float, ...]]) -> torch.Tensor | None:
        if not rows:
            return None
        return upload(torch.tensor(rows, dtype=torch.float32), self.device)


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without waiting for the work queued there."""
    if device.type != "cuda":
        return host
    # NOTE: pinned and non-blocking: a pageable copy waits for the queued forward pass, and the
    # runner could no longer queue the next step behind it (the overlap schedule).
    return host.pin_memory().to(device, non_blocking=True)
