"""What serves an OpenAI request: `model` (the base, an adapter name, or `base:adapter`) and
SGLang's `lora_path`; and the model cards of `/v1/models`. Pure apart from asking the engine which
adapters are loaded; no aiohttp.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorasrv.engine.adapter_admin import live_adapters
from lorasrv.engine.engine import Engine
from lorasrv.errors import BadRequest, ModelNotFound
from lorasrv.http.schemas import ModelCard


async def model_adapter(engine: Engine, model: str) -> str | None:
    """The adapter `model` names, or None for the base model; an unknown model is a 404.

    With LoRA off, `base:x` still names adapter x: the engine then refuses it with a message that
    says LoRA is not enabled (a 404 would say x does not exist, which is beside the point)."""
    served = engine.served_model_name
    prefix = f"{served}:"
    if model == served:
        return None
    if not engine.limits.lora_enabled and model.startswith(prefix):
        return model[len(prefix) :]
    names = live_adapters(await engine.describe_adapters())
    if model in names:
        return model
    if model.startswith(prefix) and model[len(prefix) :] in names:
        return model[len(prefix) :]
    known = ", ".join(sorted(names)[:10]) or "none"
    raise ModelNotFound(
        f"The model `{model}` does not exist. Use the base model {served!r}, an adapter name or "
        f"'{served}:<adapter>' (adapters: {known})"
    )


async def adapters_per_prompt(
    engine: Engine, model: str, lora_path: str | Sequence[str | None] | None, num_prompts: int
) -> list[str | None]:
    """One adapter (None: the base) per prompt. As in SGLang, an adapter named by `model` wins
    over `lora_path`; else `lora_path` names one for all prompts, or one (or null) per prompt.
    Whether a `lora_path` adapter is loaded is the engine's check (404 adapter_not_found)."""
    chosen = await model_adapter(engine, model)
    if chosen is not None or lora_path is None:
        return [chosen] * num_prompts
    if isinstance(lora_path, str):
        return [lora_path] * num_prompts
    if len(lora_path) != num_prompts:
        raise BadRequest(f"lora_path has {len(lora_path)} entries for {num_prompts} prompt(s)")
    return list(lora_path)


async def model_cards(engine: Engine, created: int, root: str) -> list[ModelCard]:
    """The base model's card, then one per loaded adapter (a draining version is not listed)."""
    served = engine.served_model_name
    cards = [ModelCard(id=served, created=created, root=root, parent=None)]
    cards += [
        ModelCard(id=status.name, created=created, root=status.path, parent=served)
        for status in live_adapters(await engine.describe_adapters()).values()
    ]
    return cards
