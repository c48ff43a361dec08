"""A tokenizer folder's other files, as transformers reads them: tokenizer_config.json and
special_tokens_map.json (named special tokens, BOS/EOS post-processing), chat_template.jinja,
generation_config.json and config.json (EOS ids).

Reads files only through `tokenizers` and json; never imports torch or transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tokenizers import AddedToken, Tokenizer, processors

# The named special tokens a chat template sees as variables, as transformers passes them.
SPECIAL_TOKEN_NAMES: Final = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} does not hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _special_tokens(config: dict[str, Any], special_map: dict[str, Any]) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name))
        if text is None:
            text = _token_text(special_map.get(name))
        if text is not None:
            tokens[name] = text
    return tokens


def _add_missing_special_tokens(tokenizer: Tokenizer, special_tokens: dict[str, str]) -> None:
    # transformers adds named special tokens that tokenizer.json lacks; ids must agree with it.
    missing = [t for t in special_tokens.values() if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
        )


def _set_post_processor(
    tokenizer: Tokenizer, config: dict[str, Any], special_tokens: dict[str, str]
) -> None:
    """No post-processor in tokenizer.json: add BOS/EOS as tokenizer_config.json asks."""
    bos = special_tokens.get("bos_token") if config.get("add_bos_token") is True else None
    eos = special_tokens.get("eos_token") if config.get("add_eos_token") is True else None
    if bos is None and eos is None:
        return
    single = f"{f'{bos}:0 ' if bos else ''}$A:0{f' {eos}:0' if eos else ''}"
    pair = f"{single}{f' {bos}:1' if bos else ''} $B:1{f' {eos}:1' if eos else ''}"
    pieces = {t: tokenizer.token_to_id(t) for t in (bos, eos) if t is not None}
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(t, i) for t, i in pieces.items() if i is not None],
    )


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json; of named templates, "default"."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _eos_token_ids(folder: Path, tokenizer: Tokenizer, eos_token: str | None) -> list[int]:
    """The tokenizer's EOS, then generation_config.json's and config.json's eos_token_id."""
    ids: list[int] = []
    if eos_token is not None and (eos_id := tokenizer.token_to_id(eos_token)) is not None:
        ids.append(eos_id)
    for name in ("generation_config.json", "config.json"):
        value = _read_json(folder / name).get("eos_token_id")
        values = value if isinstance(value, list) else [value]
        ids.extend(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    return list(dict.fromkeys(ids))


@dataclass(frozen=True)
class FolderParts:
    chat_template: str | None
    special_tokens: dict[str, str]
    eos_token_ids: tuple[int, ...]


def read_tokenizer_folder(folder: Path, tokenizer: Tokenizer) -> FolderParts:
    """Read the folder's config files; adds missing named special tokens and, when
    tokenizer.json has none, the BOS/EOS post-processor to `tokenizer` in place."""
    config = _read_json(folder / "tokenizer_config.json")
    special_tokens = _special_tokens(config, _read_json(folder / "special_tokens_map.json"))
    _add_missing_special_tokens(tokenizer, special_tokens)
    if tokenizer.post_processor is None:
        _set_post_processor(tokenizer, config, special_tokens)
    eos_ids = _eos_token_ids(folder, tokenizer, special_tokens.get("eos_token"))
    return FolderParts(_chat_template(folder, config), special_tokens, tuple(eos_ids))
