"""The demo tokenizer: a Llama-3-style byte-level BPE trained on the embedded corpus, built in
memory; demo.py writes it into the demo folder. Uses tokenizers only.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import Final

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lorasrv.demo_corpus import CORPUS

BOS: Final = "<|begin_of_text|>"
EOS_TEXT: Final = "<|end_of_text|>"
EOT: Final = "<|eot_id|>"
SPECIAL_TOKENS: Final = (BOS, EOS_TEXT, "<|start_header_id|>", "<|end_header_id|>", EOT)
# Llama 3's pre-tokenizer split.
SPLIT_REGEX: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A Llama-3-style byte-level BPE of `vocab_size` tokens (special ones included) trained on
    `CORPUS` (deterministic: no hash-order ties)."""
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    words: dict[str, int] = {}
    for piece, _ in pre_tokenizer.pre_tokenize_str(CORPUS):
        words[piece] = words.get(piece, 0) + 1
    vocab, merges = train_bpe(words, vocab_size - len(SPECIAL_TOKENS))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
            ),
        ]
    )
    return tokenizer


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def train_bpe(
    words: dict[str, int], vocab_size: int
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE: merge the most frequent pair (ties: smallest pair) until `vocab_size`."""
    vocab = {char: i for i, char in enumerate(byte_alphabet())}
    symbols = [list(word) for word in words]
    counts = list(words.values())
    pair_counts: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}
    for index, word in enumerate(symbols):
        _count_pairs(word, counts[index], index, pair_counts, where)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative or negative == 0:
            continue  # stale entry
        merges.append(pair)
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        changed: dict[tuple[str, str], None] = {}
        for index in sorted(where.pop(pair)):
            word, count = symbols[index], counts[index]
            changed.update(_count_pairs(word, -count, index, pair_counts, where))
            symbols[index] = word = _merge_word(word, pair)
            changed.update(_count_pairs(word, count, index, pair_counts, where))
        for changed_pair in changed:
            if pair_counts[changed_pair] > 0:
                heapq.heappush(heap, (-pair_counts[changed_pair], changed_pair))
    return vocab, merges


def _count_pairs(
    word: Sequence[str],
    count: int,
    index: int,
    pair_counts: dict[tuple[str, str], int],
    where: dict[tuple[str, str], set[int]],
) -> dict[tuple[str, str], None]:
    pairs = dict.fromkeys(itertools.pairwise(word))
    for pair in itertools.pairwise(word):
        pair_counts[pair] = pair_counts.get(pair, 0) + count
        if count > 0:
            where.setdefault(pair, set()).add(index)
    return pairs


def _merge_word(word: list[str], pair: tuple[str, str]) -> list[str]:
    merged: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged
