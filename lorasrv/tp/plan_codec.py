"""StepPlan and StepResult as flat int64 words: the TP control path's wire format (shm_channel.py).

No pickling and no msgpack on a decode step. Every StepPlan field is an int, a bool, or tuples
of them (`AdapterRows`: an int and a tuple), so a plan is one int64 array of sections, one per
field in declaration order, read back with a single `tolist()`. The layout follows the Struct's
own field types (msgspec.inspect), so a field added to StepPlan travels without a change here.
Fields of any other type (`new_seqs`: sampling params with floats and strings) go as msgpack bytes
after the words, only in the steps that carry them (a sequence's first step).

Block tables go as deltas. Both ends remember each sequence's last table (forgotten with
`freed_seq_ids`), so a decode row sends how many pages it keeps and its new pages: O(rows) per
step instead of O(rows x context). Both ends see the same plans in the same order, so their
memories agree; a table that does not extend the remembered one is sent whole.

Words, not int32: sequence and step ids grow for the life of the server. No torch, no asyncio.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, get_type_hints

import msgspec
import msgspec.inspect as mi
import numpy as np

from lorasrv.messages import StepPlan, StepResult, TokenLogprob

MAGIC = 0x4C535450  # "LSTP"
_HEADER = 4  # magic, number of words, bytes after them, flags
RESET = 1  # flag: forget every remembered table before reading this plan
#: a bound on remembered tables (sequences the engine never freed): both ends forget together
MAX_REMEMBERED = 1 << 16
_chain = itertools.chain.from_iterable


def _kind(t: Any) -> str:
    """How a field travels: scalar, ints, bools, ragged (tuples of int tuples), structs (tuples
    of Structs whose fields are ints or int tuples), or msgpack (anything else)."""
    if isinstance(t, mi.IntType | mi.BoolType):
        return "scalar"
    if isinstance(t, mi.VarTupleType):
        item = t.item_type
        if isinstance(item, mi.IntType):
            return "ints"
        if isinstance(item, mi.BoolType):
            return "bools"
        if isinstance(item, mi.VarTupleType) and isinstance(item.item_type, mi.IntType):
            return "ragged"
        if isinstance(item, mi.StructType) and all(
            _kind(f.type) in ("scalar", "ints") for f in item.fields
        ):
            return "structs"
    return "msgpack"


def _layout() -> list[tuple[str, str, Any]]:
    fields = []
    info = mi.type_info(StepPlan)
    assert isinstance(info, mi.StructType)
    for f in info.fields:
        kind = "tables" if f.name == "block_tables" else _kind(f.type)
        fields.append((f.name, kind, f.type))
    names = [name for name, _, _ in fields]
    # The table deltas are keyed by the rows' sequences: seq_ids must be read first.
    assert names.index("seq_ids") < names.index("block_tables"), names
    assert names.index("freed_seq_ids") < names.index("block_tables"), names
    return fields


FIELDS = _layout()
#: fields that travel as msgpack (never on a decode step)
MSGPACK_FIELDS = tuple(name for name, kind, _ in FIELDS if kind == "msgpack")


class PlanEncoder:
    """The coordinator's end: one per control path (it remembers what it sent)."""

    def __init__(self) -> None:
        self._tables: dict[int, tuple[int, ...]] = {}
        self._encoders = {name: msgspec.msgpack.Encoder() for name in MSGPACK_FIELDS}
        self._reset = False

    def encode(self, plan: StepPlan) -> tuple[np.ndarray, bytes]:
        """`(words, tail)`: int64 words (header first) and the msgpack bytes that follow."""
        try:
            return self._encode(plan)
        except BaseException:
            # A plan that fails here is never sent, but it may have moved the memory: the next
            # plan tells the decoder to start again from nothing, as this end does.
            self._tables.clear()
            self._reset = True
            raise

    def _encode(self, plan: StepPlan) -> tuple[np.ndarray, bytes]:
        if self._reset:
            self._tables.clear()
        _forget(self._tables, plan.freed_seq_ids)
        words: list[int] = [MAGIC, 0, 0, RESET if self._reset else 0]
        tail: list[bytes] = []
        for name, kind, _ in FIELDS:
            value = getattr(plan, name)
            if kind == "scalar":
                words.append(int(value))
            elif kind in ("ints", "bools"):
                words.append(len(value))
                words += value
            elif kind == "tables":
                self._encode_tables(words, plan.seq_ids, value)
            elif kind == "ragged":
                words.append(len(value))
                words += map(len, value)
                words += _chain(value)
            elif kind == "structs":
                _encode_structs(words, value)
            else:
                data = self._encoders[name].encode(value) if value else b""
                words.append(len(data))
                tail.append(data)
        tail_bytes = b"".join(tail)
        words[1], words[2] = len(words), len(tail_bytes)
        array = np.array(words, dtype=np.int64)
        self._reset = False
        return array, tail_bytes

    def _encode_tables(
        self, words: list[int], seq_ids: tuple[int, ...], tables: tuple[tuple[int, ...], ...]
    ) -> None:
        keeps, news = [], []
        memory = self._tables
        for seq_id, table in zip(seq_ids, tables, strict=True):
            prev = memory.get(seq_id)
            keep = 0
            if prev is not None and len(prev) <= len(table) and table[: len(prev)] == prev:
                keep = len(prev)
            keeps.append(keep)
            news.append(table[keep:] if keep else table)
            memory[seq_id] = table
        words.append(len(tables))
        words += keeps
        words += map(len, news)
        words += _chain(news)
        _bound(memory)


class PlanDecoder:
    """A worker's end: the mirror of PlanEncoder (same plans, same order, same memory)."""

    def __init__(self) -> None:
        self._tables: dict[int, tuple[int, ...]] = {}
        hints = get_type_hints(StepPlan)
        self._decoders = {name: msgspec.msgpack.Decoder(hints[name]) for name in MSGPACK_FIELDS}

    def decode(self, buffer: Any) -> StepPlan:
        """`buffer`: the encoder's words then its tail bytes, contiguous (any buffer object)."""
        head = np.frombuffer(buffer, dtype=np.int64, count=_HEADER)
        if int(head[0]) != MAGIC:
            raise ValueError(f"not a plan: magic {int(head[0]):#x}")
        num_words, tail_len = int(head[1]), int(head[2])
        if int(head[3]) & RESET:
            self._tables.clear()
        w: list[int] = np.frombuffer(buffer, dtype=np.int64, count=num_words).tolist()
        tail = bytes(memoryview(buffer)[8 * num_words : 8 * num_words + tail_len])
        values: dict[str, Any] = {}
        p, t = _HEADER, 0
        for name, kind, ftype in FIELDS:
            if kind == "scalar":
                values[name] = bool(w[p]) if isinstance(ftype, mi.BoolType) else w[p]
                p += 1
            elif kind in ("ints", "bools"):
                n = w[p]
                items = w[p + 1 : p + 1 + n]
                values[name] = tuple(map(bool, items)) if kind == "bools" else tuple(items)
                p += 1 + n
            elif kind == "tables":
                _forget(self._tables, values["freed_seq_ids"])
                values[name], p = self._decode_tables(w, p, values["seq_ids"])
            elif kind == "ragged":
                values[name], p = _decode_ragged(w, p)
            elif kind == "structs":
                values[name], p = _decode_structs(w, p, ftype.item_type)
            else:
                n = w[p]
                p += 1
                if n:
                    values[name] = self._decoders[name].decode(tail[t : t + n])
                t += n
        if p != num_words or t != tail_len:
            raise ValueError(f"plan words: read {p} of {num_words}, tail {t} of {tail_len}")
        return StepPlan(**values)

    def _decode_tables(
        self, w: list[int], p: int, seq_ids: tuple[int, ...]
    ) -> tuple[tuple[tuple[int, ...], ...], int]:
        n = w[p]
        keeps = w[p + 1 : p + 1 + n]
        lens = w[p + 1 + n : p + 1 + 2 * n]
        p += 1 + 2 * n
        memory = self._tables
        tables = []
        for seq_id, keep, length in zip(seq_ids, keeps, lens, strict=True):
            if keep:
                prev = memory[seq_id]
                if keep < len(prev):
                    prev = prev[:keep]
                table = prev + tuple(w[p : p + length]) if length else prev  # usually `prev`
            else:
                table = tuple(w[p : p + length])
            p += length
            memory[seq_id] = table
            tables.append(table)
        _bound(memory)
        return tuple(tables), p


def _forget(memory: dict[int, tuple[int, ...]], seq_ids: tuple[int, ...]) -> None:
    """Dropped before the plan's rows are read, at both ends (the order must match)."""
    for seq_id in seq_ids:
        memory.pop(seq_id, None)


def _bound(memory: dict[int, tuple[int, ...]]) -> None:
    if len(memory) > MAX_REMEMBERED:
        memory.clear()  # the next plan sends every table whole


def _encode_structs(words: list[int], items: tuple[Any, ...]) -> None:
    words.append(len(items))
    if not items:
        return
    for field in items[0].__struct_fields__:
        column = [getattr(item, field) for item in items]
        if isinstance(column[0], tuple):
            words += map(len, column)
            words += _chain(column)
        else:
            words += column


def _decode_structs(w: list[int], p: int, item: Any) -> tuple[tuple[Any, ...], int]:
    n = w[p]
    p += 1
    if not n:
        return (), p
    columns: list[list[Any]] = []
    for f in item.fields:
        if _kind(f.type) == "ints":
            lens = w[p : p + n]
            p += n
            column = []
            for length in lens:
                column.append(tuple(w[p : p + length]))
                p += length
            columns.append(column)
        else:
            columns.append(w[p : p + n])
            p += n
    make: Callable[..., Any] = item.cls
    return tuple(make(*values) for values in zip(*columns, strict=True)), p


def _decode_ragged(w: list[int], p: int) -> tuple[tuple[tuple[int, ...], ...], int]:
    n = w[p]
    lens = w[p + 1 : p + 1 + n]
    p += 1 + n
    out = []
    for length in lens:
        out.append(tuple(w[p : p + length]))
        p += length
    return tuple(out), p


# ----------------------------------------------------------------------------- results


def encode_result(result: StepResult) -> np.ndarray:
    """Words: counts (tokens, logprobs, top rows), token ids, logprob bits, then per top row its
    length, the ids, the logprob bits (float64 bits: exact)."""
    tops = result.top_logprobs
    entries = [e for row in tops for e in row]
    head = [len(result.token_ids), len(result.logprobs), len(tops)]
    ints = np.array(
        [*head, *result.token_ids, *map(len, tops), *(e.token_id for e in entries)],
        dtype=np.int64,
    )
    floats = np.array([*result.logprobs, *(e.logprob for e in entries)], dtype=np.float64)
    return np.concatenate([ints, floats.view(np.int64)])


def decode_result(buffer: Any, num_words: int) -> StepResult:
    w = np.frombuffer(buffer, dtype=np.int64, count=num_words)
    num_tokens, num_logprobs, num_tops = (int(x) for x in w[:3])
    p = 3
    token_ids = tuple(w[p : p + num_tokens].tolist())
    p += num_tokens
    lens = w[p : p + num_tops].tolist()
    p += num_tops
    num_entries = sum(lens)
    top_ids = w[p : p + num_entries].tolist()
    p += num_entries
    floats = w[p:].view(np.float64).tolist()
    logprobs, top_values = floats[:num_logprobs], floats[num_logprobs:]
    top_logprobs, q = [], 0
    for length in lens:
        row = map(TokenLogprob, top_ids[q : q + length], top_values[q : q + length])
        top_logprobs.append(tuple(row))
        q += length
    return StepResult(
        token_ids=token_ids, logprobs=tuple(logprobs), top_logprobs=tuple(top_logprobs)
    )
