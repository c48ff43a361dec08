"""Fakes for actor and engine tests: a runner that really keeps tokens in KV pages, and a
character tokenizer. The fake model's next token depends on every cached token and on the adapter
in the row's slot, so wrong page bookkeeping or a wrong slot shows up as a wrong token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from lorasrv.engine.step_runner import StepOutput
from lorasrv.ids import AdapterId, SlotId
from lorasrv.messages import ChatMessage, NewSeq, RunnerReady, StepPlan, TokenLogprob

FAKE_VOCAB = 128
FAKE_EOS = 127


def fake_next_token(tokens: Sequence[int], salt: int) -> int:
    """The fake model: a position-weighted hash of the whole context plus the adapter's salt."""
    acc = salt * 7919
    for pos, token in enumerate(tokens):
        acc = (acc * 31 + token * (pos + 1)) % 1_000_003
    return 32 + acc % 90  # printable ASCII, never EOS


def fake_generate(prompt: Sequence[int], salt: int, num_new: int) -> list[int]:
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(num_new):
        token = fake_next_token(tokens, salt)
        out.append(token)
        tokens.append(token)
    return out


class FakeRunner:
    """StepRunner without a model. `weights` of a slot is the adapter's int salt."""

    def __init__(
        self, *, num_kv_pages: int = 64, page_size: int = 4, num_slots: int = 4,
        context_length: int = 256,
    ) -> None:  # fmt: skip
        self.ready_info = RunnerReady(
            num_kv_pages=num_kv_pages,
            page_size=page_size,
            num_lora_slots=num_slots,
            max_lora_rank=16,
            lora_target_modules=("q_proj", "v_proj"),
            vocab_size=FAKE_VOCAB,
            context_length=context_length,
            eos_token_ids=(FAKE_EOS,),
            device="cpu",
            dtype="float32",
        )
        self.pages: dict[int, list[int | None]] = {}
        self.slot_salt: dict[int, int] = {}
        self.slot_adapter: dict[int, AdapterId] = {}
        self.live_seqs: set[int] = set()
        self.plans: list[StepPlan] = []
        self.num_loads = 0
        self.step_delay_s = 0.0  # simulated GPU time per step (runs on the runner thread)
        # Cleared: each step waits on the runner thread until it is set again (a busy GPU, as
        # long as a test needs one); `num_steps_started` says a step is waiting on it.
        self.gate = threading.Event()
        self.gate.set()
        self.num_steps_started = 0
        self.fail_at_step: int | None = None  # the step with this number raises (a crash)

    def ready(self) -> RunnerReady:
        return self.ready_info

    def load_slot(self, slot_id: SlotId, adapter_id: AdapterId, weights: object) -> None:
        assert isinstance(weights, int), weights
        self.slot_salt[slot_id] = weights
        self.slot_adapter[slot_id] = adapter_id
        self.num_loads += 1

    def clear_slot(self, slot_id: SlotId) -> None:
        self.slot_salt.pop(slot_id, None)
        self.slot_adapter.pop(slot_id, None)

    def shutdown(self) -> None:
        self.gate.set()  # never leave the runner thread waiting

    def new_seqs(self) -> list[NewSeq]:
        """Every sequence the runner was given, in order: its prompt and sampling params."""
        return [new for plan in self.plans for new in plan.new_seqs]

    def step(self, plan: StepPlan) -> StepOutput:
        self.num_steps_started += 1
        if self.num_steps_started == self.fail_at_step:
            raise RuntimeError(f"fake GPU failure at step {self.num_steps_started}")
        if not self.gate.wait(timeout=30):
            raise TimeoutError("FakeRunner.gate stayed closed for 30 s")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self.plans.append(plan)
        for seq_id in plan.freed_seq_ids:
            self.live_seqs.discard(seq_id)
        for new in plan.new_seqs:
            assert new.seq_id not in self.live_seqs, f"seq {new.seq_id} added twice"
            self.live_seqs.add(new.seq_id)
        _check_plan(plan)
        size = self.ready_info.page_size
        tokens: list[int] = []
        logprobs: list[float] = []
        tops: list[tuple[TokenLogprob, ...]] = []
        offset = 0
        for i, seq_id in enumerate(plan.seq_ids):
            assert seq_id in self.live_seqs, f"seq {seq_id} stepped without NewSeq"
            table = plan.block_tables[i]
            start, num_new = plan.context_lens[i], plan.query_lens[i]
            for j in range(num_new):
                pos = start + j
                page = self.pages.setdefault(table[pos // size], [None] * size)
                page[pos % size] = plan.input_ids[offset + j]
            offset += num_new
            if plan.sample_rows[i]:
                context = [self.pages[table[p // size]][p % size] for p in range(start + num_new)]
                assert None not in context, f"seq {seq_id} reads a KV slot never written"
                slot = plan.lora_slots[i]
                salt = 0 if slot < 0 else self.slot_salt[slot]
                token = fake_next_token([t for t in context if t is not None], salt)
                tokens.append(token)
                logprobs.append(-0.5)
                tops.append((TokenLogprob(token, -0.5),))
        return StepOutput(tokens, logprobs, tops)


def _check_plan(plan: StepPlan) -> None:
    rows = len(plan.seq_ids)
    for name in ("query_lens", "context_lens", "block_tables", "lora_slots", "sample_rows"):
        assert len(getattr(plan, name)) == rows, name
    assert sum(plan.query_lens) == len(plan.input_ids)
    assert list(plan.lora_slots) == sorted(plan.lora_slots), "rows must be sorted by slot"
    seen: set[int] = set()
    for table in plan.block_tables:
        assert not seen & set(table), "two rows share a KV page"
        seen |= set(table)


class FakeTextStream:
    def step(self, new_ids: list[int]) -> str:
        return "".join(chr(i) for i in new_ids)

    def flush(self) -> str:
        return ""


class FakeTokenizer:
    """One token per ASCII character; ids are code points."""

    vocab_size = FAKE_VOCAB
    eos_token_ids = (FAKE_EOS,)
    max_token_chars = 4  # a loose bound (one character per token here) is still a bound

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True
    ) -> str:
        return "".join(f"<{m.role}>{m.content}" for m in messages) + "<assistant>"

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def new_stream(self, prompt_ids: list[int], skip_special_tokens: bool) -> FakeTextStream:
        return FakeTextStream()
