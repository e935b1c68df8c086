"""Batched, constrained beam search over semantic IDs (SIDs), with a KV cache.

Every live beam of the batch sits in one (B * beam_size) tensor, user-major: row b*beam_size + j
is beam j of user b. Each digit costs one decoder step over all beams, one log-softmax over the
digit's codes, one mask of the codes that lead to no real item, one sort per user over
beam_size * codebook_size candidates, and one cache reorder. No Python loop over beams or users.

The model and the constraint are duck-typed, so this file imports nothing from the project.
What it uses of them, and nothing else:

    batch: dict with "user_ids" (B,) long and "history_sid" (B, L, n_digit) long (the model's input)
    model.config.n_digit, model.config.codebook_size                     # K = codebook_size
    memory, memory_mask = model.encode(batch["user_ids"], batch["history_sid"])  # passed back as is
    cache = model.new_cache(memory, memory_mask, beam_size)              # use_cache=True only
    logits = model.step(prev_codes (N,) or None, cache, digit)           # (N, K), N = B * beam_size
    cache.reorder(rows (N,))                                             # beams follow their parents
    logits = model.step_uncached(prefix_codes (N, digit), memory, memory_mask)  # use_cache=False only
    constraint.prefix_mask(prefix_codes (N, l) long tensor) -> (N, K) bool tensor, same device:
        the codes that extend each prefix towards a real item           # constrained=True only
    constraint.lookup(codes (N, n_digit) long tensor) -> (N,) long tensor of item ids, -1 for none

Padding: when fewer than n_return items are reachable (a small catalogue), the missing results
are item -1 with score -inf and SID -1, after all real items.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BeamResult:
    items: torch.Tensor            # (B, n_return) long, -1 = padding or (unconstrained) no item
    scores: torch.Tensor           # (B, n_return) float, summed log-probabilities, non-increasing
    sids: torch.Tensor             # (B, n_return, n_digit) long codes, -1 for padding
    invalid_rate: float | None     # unconstrained only: share of returned SIDs that match no item


@torch.no_grad()
def beam_search(model, batch: dict, beam_size: int, n_return: int, constraint,
                use_cache: bool = True, constrained: bool = True) -> BeamResult:
    """Top n_return items per user by summed log-probability of their SID.

    use_cache=False re-runs the decoder over the whole prefix at every step, with the encoder
    output expanded per beam as Hugging Face does; it is the oracle and the speed baseline.
    constrained=False generates free SIDs and maps them through `constraint.lookup` afterwards.
    """
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size: expected a positive int, got {beam_size!r}")
    if not isinstance(n_return, int) or not 1 <= n_return <= beam_size:
        raise ValueError(f"n_return: expected an int in [1, beam_size={beam_size}], got {n_return!r}")
    n_digit, n_codes = model.config.n_digit, model.config.codebook_size
    memory, memory_mask = model.encode(batch["user_ids"], batch["history_sid"])   # (B, S, E), (B, S)
    B, device = memory.shape[0], memory.device
    if B == 0:
        raise ValueError("batch: expected at least one user, got 0")
    if use_cache:
        cache = model.new_cache(memory, memory_mask, beam_size)
    else:
        memory = memory.repeat_interleave(beam_size, 0)                          # (B*beam, S, E)
        memory_mask = memory_mask.repeat_interleave(beam_size, 0)

    # Only beam 0 is live at the start, so the first step cannot pick one code twice.
    scores = torch.full((B, beam_size), float("-inf"), device=device)
    scores[:, 0] = 0.0
    prefix = torch.zeros(B * beam_size, 0, dtype=torch.long, device=device)     # (B*beam, digits so far)
    user_base = torch.arange(B, device=device)[:, None] * beam_size             # (B, 1)
    for digit in range(n_digit):
        if use_cache:
            logits = model.step(prefix[:, -1] if digit else None, cache, digit)  # (B*beam, K)
        else:
            logits = model.step_uncached(prefix, memory, memory_mask)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if constrained:
            allowed = constraint.prefix_mask(prefix)                              # (B*beam, K)
            if allowed.shape != log_probs.shape:
                raise ValueError(f"constraint: its prefix_mask gives {tuple(allowed.shape)} for the model's "
                                 f"{tuple(log_probs.shape)} logits; the index and the model disagree on "
                                 f"codebook_size ({n_codes}) or n_digit ({n_digit})")
            log_probs = log_probs.masked_fill(~allowed, float("-inf"))
        candidates = (scores.reshape(-1, 1) + log_probs).view(B, beam_size * n_codes)
        # A stable sort, not topk: equal scores keep (parent, code) order, so results are deterministic.
        scores, flat = torch.sort(candidates, dim=1, descending=True, stable=True)
        scores, flat = scores[:, :beam_size], flat[:, :beam_size]               # (B, beam)
        rows = (user_base + flat // n_codes).reshape(-1)                        # parent row of each new beam
        prefix = torch.cat([prefix[rows], (flat % n_codes).reshape(-1, 1)], dim=1)
        if use_cache and digit < n_digit - 1:                                   # no step follows the last
            cache.reorder(rows)

    items = constraint.lookup(prefix).view(B, beam_size)                        # -1: no such item
    live = torch.isfinite(scores)
    invalid_rate = None
    if not constrained:
        invalid_rate = float((items[:, :n_return] < 0).float().mean())
    items = torch.where(live, items, -1)
    sids = torch.where(live[..., None], prefix.view(B, beam_size, n_digit), -1)
    return BeamResult(items[:, :n_return], scores[:, :n_return], sids[:, :n_return], invalid_rate)
