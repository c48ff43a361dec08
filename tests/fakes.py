"""Fakes for actor and engine tests: a runner that really keeps tokens in KV pages and adapters
in LoRA rows of one arena, and a character tokenizer. The fake model's next token depends on every
cached token and on the adapter in the row's rows, so wrong page or row bookkeeping shows up as a
failed check or a wrong token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence

from lorasrv.engine.arena import ArenaGeometry
from lorasrv.engine.step_runner import DoneStep, HostInputs
from lorasrv.ids import AdapterId
from lorasrv.messages import (
    AdapterRows,
    ChatMessage,
    HostCopyReady,
    NewSeq,
    RunnerReady,
    StepPlan,
    StepResult,
    TokenLogprob,
)

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


PAGE_BYTES = 100
ROW_BYTES = 150  # a row straddles page boundaries, as real rows do


class FakeRunner:
    """StepRunner without a model, over a fake arena with the real geometry: KV pages hold
    (adapter salt, token) per slot, LoRA rows hold (adapter id, salt, rank index), and they
    overlay each other. A row reading KV written under another adapter fails (a prefix cache
    hit across adapters or versions). Writing
    KV into a page destroys the rows over it; uploading a row destroys the KV under it. So wrong
    page or row bookkeeping shows up as a failed check or a wrong token. A host copy (`weights`)
    is the adapter's int salt."""

    def __init__(
        self, *, num_kv_pages: int = 128, page_size: int = 4, context_length: int = 256,
        max_lora_rank: int = 8, lora_rows: int | None = None,
        salts: Mapping[str, int] | None = None,
    ) -> None:  # fmt: skip
        """`lora_rows`: rows in the arena's top (default: as many as fit), to bound residency."""
        max_rows = num_kv_pages * PAGE_BYTES // ROW_BYTES if lora_rows is None else lora_rows
        self.geometry = ArenaGeometry(num_kv_pages, PAGE_BYTES, ROW_BYTES, max_rows)
        self.ready_info = RunnerReady(
            num_kv_pages=num_kv_pages,
            page_size=page_size,
            kv_page_bytes=PAGE_BYTES,
            lora_row_bytes=ROW_BYTES,
            lora_max_rows=self.geometry.max_rows,
            max_lora_rank=max_lora_rank,
            lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            vocab_size=FAKE_VOCAB,
            context_length=context_length,
            eos_token_ids=(FAKE_EOS,),
            device="cpu",
            dtype="float32",
        )
        self.salts = dict(salts or {})
        self.pages: dict[int, list[tuple[int, int] | None]] = {}  # per slot: salt, token
        self.host: dict[AdapterId, tuple[int, int]] = {}  # host copies: salt, rank
        self.rows: dict[int, tuple[AdapterId, int, int]] = {}  # adapter id, salt, rank index
        self.live_seqs: set[int] = set()
        self.plans: list[StepPlan] = []
        self.num_uploads = 0
        self.step_delay_s = 0.0  # simulated GPU time per step (runs on the runner thread)
        # Cleared: each step waits on the runner thread until it is set again (a busy GPU, as
        # long as a test needs one); `num_steps_started` says a step is waiting on it.
        self.gate = threading.Event()
        self.gate.set()
        self.num_steps_started = 0
        self.fail_at_step: int | None = None  # the step with this number raises (a crash)
        self.inputs = HostInputs()  # device inputs: the tokens it returned, as TpRunner does

    def ready(self) -> RunnerReady:
        return self.ready_info

    def add_host_copy(self, copy: HostCopyReady) -> None:
        assert isinstance(copy.weights, int), copy.weights
        self.host[copy.adapter_id] = (copy.weights, copy.rank)

    def drop_host_copy(self, adapter_id: AdapterId) -> None:
        del self.host[adapter_id]

    def make_adapter_loader(self) -> Callable[[str], object]:
        return self.salts.__getitem__

    def on_failure(self, listener: Callable[[str], None]) -> None:
        pass

    def shutdown(self) -> None:
        self.gate.set()  # never leave the runner thread waiting

    def new_seqs(self) -> list[NewSeq]:
        """Every sequence the runner was given, in order: its prompt and sampling params."""
        return [new for plan in self.plans for new in plan.new_seqs]

    def launch(self, plan: StepPlan) -> DoneStep:
        return DoneStep(self.step(plan))

    def step(self, plan: StepPlan) -> StepResult:
        """Runs the plan at once; `plans` keeps it as sent (device inputs unfilled)."""
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
        _check_plan(plan, self.ready_info.page_size)
        for upload in plan.uploads:
            self._upload(upload)
        salts = [self._adapter_salt(a) for a in plan.adapters]
        resolved = self.inputs.resolve(plan)
        result = self._run_rows(resolved, salts)
        self.inputs.record(resolved, result)
        return result

    def _upload(self, upload: AdapterRows) -> None:
        assert upload.adapter_id in self.host, (
            f"upload of adapter id {upload.adapter_id}: no host copy"
        )
        salt, rank = self.host[upload.adapter_id]
        assert len(upload.rows) == rank, f"adapter id {upload.adapter_id}: {len(upload.rows)} rows"
        for i, row in enumerate(upload.rows):
            for page in self.geometry.row_pages(row):
                self.pages.pop(page, None)  # the row's bytes overwrite whatever KV was there
            self.rows[row] = (upload.adapter_id, salt, i)
        self.num_uploads += 1

    def _adapter_salt(self, adapter: AdapterRows) -> int:
        held = [self.rows.get(row) for row in adapter.rows]
        salts = {h[1] for h in held if h is not None}
        assert len(salts) == 1, f"adapter id {adapter.adapter_id}: rows hold {held}"
        expected = [(adapter.adapter_id, next(iter(salts)), i) for i in range(len(adapter.rows))]
        assert held == expected, f"adapter id {adapter.adapter_id}: rows hold {held}"
        return expected[0][1]

    def _write_kv(self, page: int, pos: int, token: tuple[int, int]) -> None:
        for row in self.geometry.page_rows(page):
            self.rows.pop(row, None)  # KV bytes overwrite the rows over this page
        self.pages.setdefault(page, [None] * self.ready_info.page_size)[pos] = token

    def _run_rows(self, plan: StepPlan, salts: list[int]) -> StepResult:
        size = self.ready_info.page_size
        tokens: list[int] = []
        tops: list[tuple[TokenLogprob, ...]] = []
        offset = 0
        for i, seq_id in enumerate(plan.seq_ids):
            assert seq_id in self.live_seqs, f"seq {seq_id} stepped without NewSeq"
            table = plan.block_tables[i]
            start, num_new = plan.context_lens[i], plan.query_lens[i]
            index = plan.lora_adapters[i]
            salt = 0 if index < 0 else salts[index]
            for j in range(num_new):
                pos = start + j
                self._write_kv(table[pos // size], pos % size, (salt, plan.input_ids[offset + j]))
            offset += num_new
            if plan.sample_rows[i]:
                context = [self.pages.get(table[p // size], [None] * size)[p % size]
                           for p in range(start + num_new)]  # fmt: skip
                assert None not in context, f"seq {seq_id} reads a KV slot never written"
                assert all(c is not None and c[0] == salt for c in context), (
                    f"seq {seq_id} reads KV computed under another adapter"
                )
                token = fake_next_token([c[1] for c in context if c is not None], salt)
                tokens.append(token)
                tops.append((TokenLogprob(token, -0.5),))
        return StepResult(
            token_ids=tuple(tokens), logprobs=(-0.5,) * len(tokens), top_logprobs=tuple(tops)
        )


def _check_plan(plan: StepPlan, page_size: int) -> None:
    rows = len(plan.seq_ids)
    for name in ("query_lens", "context_lens", "block_tables", "lora_adapters", "sample_rows"):
        assert len(getattr(plan, name)) == rows, name
    assert sum(plan.query_lens) == len(plan.input_ids)
    assert list(plan.lora_adapters) == sorted(plan.lora_adapters), "rows must be sorted by adapter"
    assert set(plan.lora_adapters) - {-1} == set(range(len(plan.adapters))), "unused adapters"
    # Rows may share pages they only read (cached prefixes); a page a row writes is its own.
    users: dict[int, int] = {}
    for table in plan.block_tables:
        for page in set(table):
            users[page] = users.get(page, 0) + 1
    for table, start, num_new in zip(plan.block_tables, plan.context_lens, plan.query_lens,
                                     strict=True):  # fmt: skip
        written = {table[pos // page_size] for pos in range(start, start + num_new)}
        assert all(users[page] == 1 for page in written), "a row writes a page another row uses"
    taken: set[int] = set()
    for adapter in (*plan.adapters, *plan.uploads):
        assert len(set(adapter.rows)) == len(adapter.rows), "an adapter lists a row twice"
    for upload in plan.uploads:
        assert not taken & set(upload.rows), "two uploads share a row"
        taken |= set(upload.rows)


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
