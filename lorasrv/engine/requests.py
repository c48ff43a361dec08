"""Submission: one request as `Engine.submit` takes it. Pure and typed; wire formats (SGLang's
/generate, OpenAI's bodies) are turned into Submissions in `lorasrv.http`, never here.
"""

from __future__ import annotations

import msgspec

from lorasrv.messages import ChatMessage, SamplingParams


class Submission(msgspec.Struct, frozen=True, kw_only=True):
    """Exactly one of `text`, `input_ids` or `messages` (rendered with the chat template).

    `lora_name` None is the base model; `request_id` None gets a fresh id. Values are checked
    once, by `engine.validation.check_submission`, when the engine takes the submission.
    """

    text: str | None = None
    input_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    lora_name: str | None = None
    request_id: str | None = None
