"""HF tokenizer folders: encode, chat template, decode, streaming detokenize, stop strings.

Reads files only through `tokenizers` and jinja2 (sandboxed); never imports torch or transformers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from tokenizers import Tokenizer

from lorasrv.engine.chat_template import compile_chat_template
from lorasrv.engine.tokenizer_files import read_tokenizer_folder
from lorasrv.messages import ChatMessage

# A stream emits anyway after this many tokens without a complete character (garbage bytes).
MAX_PENDING_TOKENS: Final = 32
GIL_FREE_ENCODE_CHARS: Final = 1024


class DetokenizerStream(Protocol):
    """One request's output text, in pieces: `step` per new ids, `flush` once at the end."""

    def step(self, new_ids: Sequence[int]) -> str: ...

    def flush(self) -> str: ...


class Detokenizer(Protocol):
    """What the tokenizer actor needs; `HfTokenizer` and test fakes satisfy it."""

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_token_chars(self) -> int:
        """An upper bound on the characters one token stands for (bounds prompts cheaply)."""
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True
    ) -> str: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def new_stream(
        self, prompt_ids: Sequence[int], skip_special_tokens: bool
    ) -> DetokenizerStream: ...


class _Decodes(Protocol):
    @property
    def all_special_ids(self) -> tuple[int, ...]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class HfTokenizer:
    """A tokenizer folder (tokenizer.json and friends) loaded with `tokenizers`."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._special_tokens = dict(special_tokens or {})
        self._chat_template_source = chat_template
        self._chat_template = (
            None if chat_template is None else compile_chat_template(chat_template)
        )
        self._eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values(), default=-1) + 1
        # NOTE: a token's vocabulary string is never shorter than the text it encodes (byte-level
        # BPE shows one character per byte, SentencePiece's '▁' is the space it replaces); x2
        # leaves room for normalizers that compose characters (NFC).
        self._max_token_chars = 2 * max(map(len, vocab), default=1)
        added = tokenizer.get_added_tokens_decoder()
        self._all_special_ids = tuple(sorted(i for i, token in added.items() if token.special))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its parts (a compiled chat template is not picklable): how a Ray Serve
        ingress gets its replicas' tokenizer (lorasrv.deploy.ray)."""
        parts = (self._tokenizer, self._chat_template_source, self._special_tokens,
                 self._eos_token_ids)  # fmt: skip
        return (_rebuild, parts)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> HfTokenizer:
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"tokenizer folder {str(folder)!r} does not exist or is not a folder")
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(
                f"{str(folder)!r} has no tokenizer.json: lorasrv reads only the fast-tokenizer "
                "format (save the tokenizer once with transformers' save_pretrained to produce it)"
            )
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:
            raise ValueError(f"cannot read {str(tokenizer_file)!r}: {exc}") from exc
        tokenizer.no_truncation()  # as transformers' __call__: a prompt is never cut or padded
        tokenizer.no_padding()
        parts = read_tokenizer_folder(folder, tokenizer)
        return cls(
            tokenizer,
            chat_template=parts.chat_template,
            special_tokens=parts.special_tokens,
            eos_token_ids=parts.eos_token_ids,
        )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids (base vocabulary plus added tokens)."""
        return self._vocab_size

    @property
    def max_token_chars(self) -> int:
        return self._max_token_chars

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        return self._all_special_ids

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    @property
    def chat_template(self) -> str | None:
        return self._chat_template_source

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > GIL_FREE_ENCODE_CHARS:
            # NOTE: `Tokenizer.encode` holds the GIL for the whole call (a long prompt encoded on
            # a worker thread would still stall the event loop); `encode_batch` releases it.
            (encoding,) = self._tokenizer.encode_batch(
                [text], add_special_tokens=add_special_tokens
            )
            return list(encoding.ids)
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if len(ids) > GIL_FREE_ENCODE_CHARS:  # as encode: decode_batch releases the GIL
            (text,) = self._tokenizer.decode_batch(
                [list(ids)], skip_special_tokens=skip_special_tokens
            )
            return text
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True
    ) -> str:
        """Render as transformers' `apply_chat_template(..., tokenize=False)` does.

        The text usually starts with the BOS token: encode it with `add_special_tokens=False`.
        """
        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat template; send a plain prompt instead")
        return self._chat_template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self._special_tokens,
        )

    def new_stream(
        self, prompt_ids: Sequence[int], skip_special_tokens: bool
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


class IncrementalDetokenizer:
    """One request's output ids -> text pieces whose concatenation equals `decode(output_ids)`.

    Prefix/read offsets: a window of ids starts at a character boundary; its first `read` ids are
    already emitted. A step decodes the window with and without the new ids and emits the
    difference, unless it ends in an incomplete UTF-8 sequence ("\\ufffd"). Emitted ids before
    the window are dropped, so a step costs O(window), not O(output length).
    """

    __slots__ = ("_ids", "_read", "_skip_ids", "_skip_special_tokens", "_tokenizer")

    def __init__(
        self, tokenizer: _Decodes, prompt_ids: Sequence[int], skip_special_tokens: bool
    ) -> None:
        # NOTE: prompt_ids are not used as decoding context, so the text is exactly
        # decode(output_ids) (a SentencePiece first token loses its leading space, as there).
        del prompt_ids
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Skipped ids never enter the window: one there could take the place of the first
        # token, whose leading space some decoders (SentencePiece) strip.
        self._skip_ids = frozenset(tokenizer.all_special_ids if skip_special_tokens else ())
        self._ids: list[int] = []  # from the window start on
        self._read = 0  # ids[:read] are emitted

    def step(self, new_ids: Sequence[int]) -> str:
        self._ids.extend(i for i in new_ids if i not in self._skip_ids)
        if len(self._ids) == self._read:
            return ""
        new_text = self._decode(self._ids)
        if new_text.endswith("\ufffd") and len(self._ids) - self._read < MAX_PENDING_TOKENS:
            return ""
        return self._advance(new_text)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end)."""
        if len(self._ids) == self._read:
            return ""
        return self._advance(self._decode(self._ids))

    def _advance(self, new_text: str) -> str:
        emitted = self._decode(self._ids[: self._read])
        del self._ids[: self._read]
        self._read = len(self._ids)
        return new_text[len(emitted) :]

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


# ----------------------------------------------------------------------------- stop strings


def find_stop(text: str, stops: Sequence[str], search_from: int) -> int | None:
    """Index where the earliest stop string starts in `text`, or None.

    `text[:search_from]` was searched before, so only a match that ends after it can be new.
    Empty stop strings are ignored.
    """
    stops = [stop for stop in stops if stop]
    if not stops:
        return None
    start = max(0, search_from - max(len(stop) for stop in stops) + 1)
    found = [i for stop in stops if (i := text.find(stop, start)) != -1]
    return min(found, default=None)


def holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string.

    A stream emits `text[: len(text) - holdback(text, stops)]`, so it never sends text that a
    later token turns into (part of) a stop string.
    """
    best = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:length]):
                best = length
                break
    return best


def _rebuild(
    tokenizer: Tokenizer,
    chat_template: str | None,
    special_tokens: dict[str, str],
    eos_token_ids: tuple[int, ...],
) -> HfTokenizer:
    return HfTokenizer(
        tokenizer,
        chat_template=chat_template,
        special_tokens=special_tokens,
        eos_token_ids=eos_token_ids,
    )
