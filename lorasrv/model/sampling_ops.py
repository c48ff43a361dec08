"""The sampler's pure tensor operations: penalties, top-k/top-p, and seeding. No state."""

from __future__ import annotations

import torch

_UINT64_MASK = 0xFFFF_FFFF_FFFF_FFFF


def apply_penalties(
    logits: torch.Tensor,  # [n, vocab] float32
    counts: torch.Tensor,  # [n, vocab] int32: occurrences in the output so far
    prompt_mask: torch.Tensor,  # [n, vocab] bool: token occurs in the prompt
    params: torch.Tensor,  # [n, 3] repetition, frequency, presence
) -> torch.Tensor:
    """vLLM's penalties, out of place. Repetition scales tokens seen in prompt or output (divide
    positive logits, multiply the rest); frequency subtracts penalty * output count; presence
    subtracts penalty once per token present in the output."""
    output_mask = counts > 0  # [n, vocab]
    repetition = params[:, 0:1]  # [n, 1]
    seen = prompt_mask | output_mask
    scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, scaled, logits)
    logits = logits - params[:, 1:2] * counts
    return logits - params[:, 2:3] * output_mask


def apply_top_k_top_p(
    logits: torch.Tensor,  # [m, vocab] float32, already divided by temperature
    top_k: torch.Tensor,  # [m] float; >= vocab = disabled
    top_p: torch.Tensor,  # [m] float; inf = disabled
) -> torch.Tensor:
    """Sets logits outside the top k, then outside the nucleus, to -inf (out of place).

    The nucleus is the smallest prefix of the sorted distribution whose mass reaches top_p; the
    first token is always kept. Ties at the k boundary are broken by sort order, so exactly k stay.
    """
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [m, vocab]
    positions = torch.arange(logits.shape[-1], device=logits.device)  # [vocab]
    outside_k = positions[None, :] >= top_k[:, None]  # [m, vocab]
    sorted_logits = sorted_logits.masked_fill(outside_k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)  # [m, vocab]
    mass_before = probs.cumsum(dim=-1) - probs
    outside_p = mass_before >= top_p[:, None]
    outside_p[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(outside_p, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def draw_seed(seed: int, index: int) -> int:
    """The seed of a seeded row's draw for its `index`-th generated token: splitmix64 of both,
    so neighbouring positions and seeds get unrelated streams."""
    z = (seed + (index + 1) * 0x9E37_79B9_7F4A_7C15) & _UINT64_MASK
    z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & _UINT64_MASK
    z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & _UINT64_MASK
    return z ^ (z >> 31)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    # Masked so any Python int (negative, > 64 bits) is a valid seed.
    generator.manual_seed(seed & _UINT64_MASK)
    return generator
