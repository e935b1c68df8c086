"""RPG_ED: an encoder-decoder generative recommender over 4-token semantic IDs (SIDs).

The encoder reads one hashed user token and the user's last `max_history` items; each item's 4
SID-token embeddings are reduced to one vector and passed through an MLP, so 50 items cost 50
encoder positions, not 200. With `n_items` > 0, each history item also adds an embedding of its
own id, the exact key a Markov chain or SASRec reads; set_items(codes) tells the model which SID
is which item. It is on the input side only: an item the model was not built with, such as one
added after training, uses one shared row. The decoder reads [BOS, s0, s1, s2, s3] and predicts
[s0, s1, s2, s3, EOS], attending to the encoder output through cross-attention. It follows
TIGER (Rajput et al., NeurIPS 2023) over OPQ semantic IDs as in RPG (Hou et al., 2025); the block
layout follows GPT-2 / whisper (pre-LayerNorm). RPGEDConfig's defaults are the "seed config", the
model size of the original design (for a GPU); train.py's presets shrink it for a CPU.

One vocabulary, no overlapping ranges (the same layout as sid.py):

    0 PAD | 1 BOS | 2 EOS | 3 .. 3+U-1 user buckets | 3+U + d*256 + c for SID digit d, code c

Batch (all token ids except `user_ids`, which are bucket indices in [0, U), read only when U > 0):

    user_ids          [B]        long
    history_sid       [B, L, 4]  long, L <= max_history, oldest first, LEFT-padded with PAD (0)
    decoder_input_ids [B, 5]     [BOS, s0, s1, s2, s3]       (training only)
    decoder_labels    [B, 5]     [s0, s1, s2, s3, EOS]       (training only)

Inference interface used by beam.py (duck-typed; codes in, codes out, no token arithmetic there):

    memory, memory_mask = model.encode(user_ids, history_sid)      # [B, S, E], [B, S]
    cache = model.new_cache(memory, memory_mask, n_beams)          # cross K/V once per user
    logits = model.step(prev_codes, cache, digit)                  # [B*n_beams, 256] for that digit
    cache.reorder(index)                                           # beams follow their parents
    logits = model.step_uncached(prefix_codes, memory, memory_mask)  # the same, no cache (oracle)

generate(batch, index) runs beam.beam_search (imported there, so this file alone still trains and
scores) with `index` as the constraint: index.prefix_mask and index.lookup (sid.SIDIndex or any
object with the two methods, see beam.py); it also looks up every history SID, to refuse one
that is no item. Shapes use B users, L history items, S encoder positions, E = n_embd, H heads,
hd = E / H, N decoder rows; d is a digit index.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


PAD, BOS, EOS = 0, 1, 2
N_SPECIAL = 3


@dataclass
class RPGEDConfig:
    """The model's shape; the defaults are the original design's (seed) values."""
    n_digit: int = 4                 # SID length (tokens per item)
    codebook_size: int = 256         # codes per digit
    n_user_buckets: int = 10000      # users are hashed into this many tokens; 0: no user token
    max_history: int = 50            # history items read by the encoder
    encoder_n_layer: int = 4         # encoder blocks
    decoder_n_layer: int = 4         # decoder blocks
    n_head: int = 8                  # attention heads
    n_embd: int = 448                # model width E (d is kept for a digit index)
    n_inner: int = 1024              # hidden width of every MLP
    dropout: float = 0.1             # on embeddings, each residual branch and the history MLP
    attn_pdrop: float = 0.1          # on attention weights
    beam_size: int = 10              # beams in generate()
    n_items: int = 0                 # items with their own id embedding (+1 row shared by any other); 0: none

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "float": float, "bool": bool, "str": str}[f.type]
            if type(value) is not expected and not (expected is float and type(value) is int):
                raise ValueError(f"config.{f.name}: expected {f.type}, got {value!r}")
            if expected is int and value <= 0 and not (f.name in ("n_user_buckets", "n_items") and value == 0):
                raise ValueError(f"config.{f.name}: expected a positive int, got {value}")
            if expected is float and not math.isfinite(value):
                raise ValueError(f"config.{f.name}: expected a finite number, got {value}")
        for name in ("dropout", "attn_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"config.{name}: expected a probability in [0, 1), got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.codebook_size > 256:
            raise ValueError(f"config.codebook_size: expected at most 256 (uint8 codes), got {self.codebook_size}")
        if self.n_items and self.codebook_size ** self.n_digit >= 2 ** 62:
            raise ValueError(f"config.n_digit: expected codebook_size ** n_digit < 2**62 with n_items (one int64 key "
                             f"per SID), got {self.codebook_size} ** {self.n_digit}")

    @property
    def sid_offset(self) -> int:
        """Token id of digit 0, code 0."""
        return N_SPECIAL + self.n_user_buckets

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + self.n_user_buckets + self.n_digit * self.codebook_size

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _check_ids(name: str, ids, shape_hint: str, ndim: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name}: expected a torch tensor {shape_hint}, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name}: expected integer ids {shape_hint}, got dtype {ids.dtype}")
    if ids.dim() != ndim:
        raise ValueError(f"{name}: expected shape {shape_hint}, got {tuple(ids.shape)}")
    return ids.long()


# ----------------------------------------------------------------------------------------------
# Attention and the decoding cache
# ----------------------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              dropout: nn.Module | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √hd, masked) v.

    q : Tensor, shape = (B, H, Tq, hd);  k, v : Tensor, shape = (B, H, Tk, hd)
    mask : bool Tensor broadcastable to (B, H, Tq, Tk); True where a query may look.
    A query row with no visible key gets zeros, never NaN: masked scores get the dtype's
    minimum instead of -inf (so softmax stays finite), and such rows are zeroed at the end.
    """
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)        # (B, H, Tq, Tk)
    weights = torch.softmax(scores.add_(bias), dim=-1)                          # in place: no copy
    if dropout is not None:
        weights = dropout(weights)
    visible = mask.any(-1, keepdim=True)                                        # (.., Tq, 1)
    return (weights @ v) * visible                                              # (B, H, Tq, hd)


class DecoderCache:
    """Everything the decoder keeps between steps, for all layers.

    self_kv  : (n_layer, 2, N, H, T_max, hd) preallocated; N = B * n_beams rows, user-major
               (row b * n_beams + j is beam j of user b). Step t writes position t.
    cross_kv : per layer (K, V), each (B, H, S, hd): computed once from the encoder output and
               shared by all beams of a user (queries are grouped per user, nothing is copied).
    memory_mask : (B, S) bool, True for real encoder positions.
    """

    def __init__(self, self_kv: torch.Tensor, cross_kv: list, memory: torch.Tensor, memory_mask: torch.Tensor):
        self.self_kv = self_kv
        self.cross_kv = cross_kv
        self.memory = memory            # (B, S, E), kept only to select cross-attention
        self.memory_mask = memory_mask

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (N, H, T, hd) at positions start_pos.., then return all keys and values so far
        (N, H, start_pos+T, hd) each: what the new queries attend to."""
        end = start_pos + k.shape[2]
        self.self_kv[layer, 0, :, :, start_pos:end] = k
        self.self_kv[layer, 1, :, :, start_pos:end] = v
        return self.self_kv[layer, 0, :, :, :end], self.self_kv[layer, 1, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Row i continues old row index[i] (index stays within each user's block of beams)."""
        self.self_kv = self.self_kv.index_select(2, index)


class MultiHeadAttention(nn.Module):
    """Self-attention (memory=None) or cross-attention to `memory`, with an optional cache."""

    def __init__(self, config: RPGEDConfig):
        super().__init__()
        self.n_head = config.n_head
        self.query = nn.Linear(config.n_embd, config.n_embd)
        self.key_value = nn.Linear(config.n_embd, 2 * config.n_embd)
        self.out = nn.Linear(config.n_embd, config.n_embd)
        self.attn_drop = nn.Dropout(config.attn_pdrop)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, E = x.shape
        return x.view(B, T, self.n_head, E // self.n_head).transpose(1, 2)      # (B, H, T, hd)

    def project_kv(self, source: torch.Tensor):
        """source (B, S, E) -> K, V each (B, H, S, hd). The one projection used with and without cache."""
        k, v = self.key_value(source).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor | None = None,
                cache: DecoderCache | None = None, layer: int = 0, start_pos: int = 0) -> torch.Tensor:
        """x (N, T, E) -> (N, T, E).

        Self-attention (memory is None): mask broadcasts to (N, H, T, Tk), Tk = start_pos + T;
        with a cache, this step's K/V are written at start_pos and all earlier ones are read.
        Cross-attention: memory (B, S, E) with N = B * g rows (g beams per user, user-major);
        mask is the memory mask (B, S). With a cache, the K/V projected once from this memory
        are read from it instead of being projected again.
        """
        N, T, E = x.shape
        q = self.split_heads(self.query(x))                                     # (N, H, T, hd)
        if memory is None:                                                      # self-attention
            k, v = self.project_kv(x)                                           # (N, H, T, hd)
            if cache is not None:
                k, v = cache.update(layer, start_pos, k, v)                      # (N, H, start_pos+T, hd)
            y = attention(q, k, v, mask, self.attn_drop)
        else:                                                                   # cross-attention
            k, v = cache.cross_kv[layer] if cache is not None else self.project_kv(memory)
            B = k.shape[0]
            group = N // B                                                      # beams per user
            # (N, H, T, hd) -> (B, H, group*T, hd): a user's beams become extra query rows
            q = q.view(B, group, self.n_head, T, -1).transpose(1, 2).reshape(B, self.n_head, group * T, -1)
            y = attention(q, k, v, mask[:, None, None, :], self.attn_drop)      # (B, H, group*T, hd)
            y = y.view(B, self.n_head, group, T, -1).transpose(1, 2).reshape(N, self.n_head, T, -1)
        y = y.transpose(1, 2).reshape(N, T, E)                                  # (N, T, E)
        return self.out(y)


# ----------------------------------------------------------------------------------------------
# Blocks. Pre-LayerNorm (GPT-2, whisper): each branch sees a normalised input and adds to an
# untouched residual stream, which trains stably without a long warmup; post-LN needs one.
# ----------------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self, n_embd: int, n_inner: int, pdrop: float):
        super().__init__()
        self.fc = nn.Linear(n_embd, n_inner)
        self.proj = nn.Linear(n_inner, n_embd)
        self.drop = nn.Dropout(pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class EncoderBlock(nn.Module):
    """Bidirectional self-attention (padding mask only) and an MLP."""

    def __init__(self, config: RPGEDConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.n_embd)
        self.attn = MultiHeadAttention(config)
        self.ln_mlp = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config.n_embd, config.n_inner, config.dropout)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), mask))
        return x + self.mlp(self.ln_mlp(x))


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, and an MLP."""

    def __init__(self, config: RPGEDConfig):
        super().__init__()
        self.ln_self = nn.LayerNorm(config.n_embd)
        self.self_attn = MultiHeadAttention(config)
        self.ln_cross = nn.LayerNorm(config.n_embd)
        self.cross_attn = MultiHeadAttention(config)
        self.ln_mlp = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config.n_embd, config.n_inner, config.dropout)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor, memory: torch.Tensor,
                memory_mask: torch.Tensor, cache: DecoderCache | None = None, layer: int = 0,
                start_pos: int = 0) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.ln_self(x), causal_mask, None, cache, layer, start_pos))
        x = x + self.drop(self.cross_attn(self.ln_cross(x), memory_mask, memory, cache, layer))
        return x + self.mlp(self.ln_mlp(x))


class HistoryCompressor(nn.Module):
    """(B, L, 4, E) SID-token embeddings -> (B, L, E): one encoder position per history item.

    The average of the 4 digit embeddings, then a residual MLP. Each digit has its own token
    range, so the average still tells the digits apart, costs nothing, and keeps the width at E.
    """

    def __init__(self, config: RPGEDConfig):
        super().__init__()
        self.ln = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config.n_embd, config.n_inner, config.dropout)

    def forward(self, item_token_emb: torch.Tensor) -> torch.Tensor:
        items = item_token_emb.mean(dim=2)                                      # (B, L, E)
        return items + self.mlp(self.ln(items))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class RPG_ED(nn.Module):
    def __init__(self, config: RPGEDConfig):
        super().__init__()
        self.config = config
        c = config
        self.token_emb = nn.Embedding(c.vocab_size, c.n_embd)                   # shared by all inputs
        self.encoder_pos = nn.Embedding(1 + c.max_history, c.n_embd)            # user token + items
        self.decoder_pos = nn.Embedding(1 + c.n_digit, c.n_embd)                # BOS + digits
        self.history_compressor = HistoryCompressor(c)
        if c.n_items:                  # item identity beside its codes: row i is item i, row n_items any other
            self.item_emb = nn.Embedding(c.n_items + 1, c.n_embd)
            # filled by set_items (or load_state_dict); until then no SID matches (keys are >= 0)
            self.register_buffer("item_keys", torch.full((c.n_items,), -1, dtype=torch.long))  # sorted SID keys
            self.register_buffer("item_order", torch.zeros(c.n_items, dtype=torch.long))       # item of each key
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(EncoderBlock(c) for _ in range(c.encoder_n_layer))
        self.ln_encoder = nn.LayerNorm(c.n_embd)
        self.decoder = nn.ModuleList(DecoderBlock(c) for _ in range(c.decoder_n_layer))
        self.ln_decoder = nn.LayerNorm(c.n_embd)
        # (T, T) causal mask, built once: query t sees keys 0..t
        self.register_buffer("causal", torch.ones(1 + c.n_digit, 1 + c.n_digit, dtype=torch.bool).tril(),
                             persistent=False)
        # digit_offsets[d]: token id of digit d, code 0
        self.register_buffer("digit_offsets", c.sid_offset + c.codebook_size * torch.arange(c.n_digit),
                             persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale each residual branch's output projection by 1/sqrt(number of branches)
        for stack, branches in ((self.encoder, 2 * c.encoder_n_layer), (self.decoder, 3 * c.decoder_n_layer)):
            for name, p in stack.named_parameters():
                if name.endswith("out.weight") or name.endswith("mlp.proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(branches))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_items(self, codes: torch.Tensor) -> None:
        """codes (n_items, 4): the SID codes of item 0..n_items-1, whose id embeddings are rows 0..n_items-1."""
        c = self.config
        if not c.n_items:
            raise ValueError("set_items: expected a model with item-id embeddings, got config.n_items = 0")
        if tuple(codes.shape) != (c.n_items, c.n_digit) or codes.min() < 0 or codes.max() >= c.codebook_size:
            values = f", values in [{int(codes.min())}, {int(codes.max())}]" if codes.numel() else ""
            raise ValueError(f"codes: expected shape [{c.n_items}, {c.n_digit}] with values in [0, {c.codebook_size}), "
                             f"got shape {tuple(codes.shape)}{values}")
        keys = self._sid_keys(codes.to(self.item_keys.device).long())
        order = keys.argsort()
        if (keys[order][1:] == keys[order][:-1]).any():
            raise ValueError("codes: expected a different SID for each item, got a SID shared by two items")
        self.item_keys.copy_(keys[order])
        self.item_order.copy_(order)

    def _sid_keys(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., 4) codes -> (...) one int per SID (its digits in base codebook_size)."""
        c = self.config
        return (codes * c.codebook_size ** torch.arange(c.n_digit - 1, -1, -1, device=codes.device)).sum(-1)

    def item_rows(self, history_sid: torch.Tensor) -> torch.Tensor:
        """history_sid (B, L, 4) tokens -> (B, L) rows of item_emb: the item of each SID, or n_items
        for a SID the model was not built with (and for PAD). In training, a `dropout` share of the
        positions also get row n_items, so that row learns to stand for an item seen only by its codes
        (with dropout 0 it stays as initialised)."""
        c = self.config
        keys = self._sid_keys(history_sid - self.digit_offsets)                 # (B, L)
        pos = torch.searchsorted(self.item_keys, keys).clamp(max=c.n_items - 1)  # past the end: last key
        rows = torch.where(self.item_keys[pos] == keys, self.item_order[pos], c.n_items)
        if self.training and c.dropout:
            rows = rows.masked_fill(torch.rand(rows.shape, device=rows.device) < c.dropout, c.n_items)
        return rows

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- input checks (for a caller's batch; the training loop's batches are valid by construction) --
    def check_batch(self, batch: dict) -> None:
        """Raise ValueError unless `batch` has the layout of the module docstring.

        generate() calls it on every request. Training batches are built (evaluate.make_batch) from
        tables checked once, so forward() does not re-check them: on a GPU each check is a host sync.
        """
        c = self.config
        user_ids = _check_ids("user_ids", batch["user_ids"], "[B]", 1)
        history_sid = _check_ids("history_sid", batch["history_sid"], f"[B, L<={c.max_history}, {c.n_digit}]", 3)
        B, L, D = history_sid.shape
        if B == 0:
            raise ValueError("user_ids: expected at least one user in the batch, got 0")
        if L > c.max_history or D != c.n_digit or B != user_ids.shape[0]:
            raise ValueError(f"history_sid: expected shape [{user_ids.shape[0]}, L<={c.max_history}, {c.n_digit}], "
                             f"got {tuple(history_sid.shape)}")
        if c.n_user_buckets and (user_ids.min() < 0 or user_ids.max() >= c.n_user_buckets):
            raise ValueError(f"user_ids: expected bucket indices in [0, {c.n_user_buckets}), "
                             f"got values in [{int(user_ids.min())}, {int(user_ids.max())}]")
        codes = history_sid - self.digit_offsets
        padded = history_sid == PAD
        bad = ~padded & ((codes < 0) | (codes >= c.codebook_size))
        partial = padded.any(-1) & ~padded.all(-1)
        if bad.any() or partial.any():
            b, l, d = (bad | partial[..., None]).nonzero()[0].tolist()
            raise ValueError(f"history_sid[{b}, {l}]: expected PAD in all {c.n_digit} digits or digit-d tokens in "
                             f"[{c.sid_offset} + {c.codebook_size}*d, +{c.codebook_size}), got "
                             f"{history_sid[b, l].tolist()}")
        for name, special_first in (("decoder_input_ids", True), ("decoder_labels", False)):
            if name in batch:
                self._check_decoder_ids(name, batch[name], B, special_first)

    def _check_decoder_ids(self, name: str, ids, B: int, special_first: bool) -> None:
        """ids (B, n_digit+1): [BOS, s0..s3] or [s0..s3, EOS], digit d in digit d's range."""
        c = self.config
        ids = _check_ids(name, ids, f"[{B}, {c.n_digit + 1}]", 2)
        if tuple(ids.shape) != (B, c.n_digit + 1):
            raise ValueError(f"{name}: expected shape [{B}, {c.n_digit + 1}], got {tuple(ids.shape)}")
        special, codes = (ids[:, 0], ids[:, 1:]) if special_first else (ids[:, -1], ids[:, :-1])
        codes = codes - self.digit_offsets
        bad = ((codes < 0) | (codes >= c.codebook_size)).any(1) | (special != (BOS if special_first else EOS))
        if bad.any():
            row = int(bad.nonzero()[0])
            layout = "[BOS, s0, s1, s2, s3]" if special_first else "[s0, s1, s2, s3, EOS]"
            raise ValueError(f"{name}[{row}]: expected {layout} with digit d in [{c.sid_offset} + "
                             f"{c.codebook_size}*d, +{c.codebook_size}) (vocab size {c.vocab_size}), "
                             f"got {ids[row].tolist()}")

    # -- encoder --------------------------------------------------------------------------------
    def encode(self, user_ids: torch.Tensor, history_sid: torch.Tensor):
        """user_ids (B,), history_sid (B, L, 4) -> memory (B, S, E), memory_mask (B, S) bool.

        S = 1 + L with the user token, else L. History is left-padded: position embeddings are
        indexed so that the most recent item always sits at position max_history, whatever L.
        """
        c = self.config
        B, L, _ = history_sid.shape
        items = self.history_compressor(self.token_emb(history_sid))           # (B, L, E)
        if c.n_items:
            items = items + self.item_emb(self.item_rows(history_sid))
        item_mask = history_sid[:, :, 0] != PAD                                 # (B, L)
        positions = torch.arange(c.max_history - L + 1, c.max_history + 1, device=items.device)
        x = items + self.encoder_pos(positions)
        mask = item_mask
        if c.n_user_buckets:                                                    # the user token
            user = self.token_emb(N_SPECIAL + user_ids)[:, None] + self.encoder_pos.weight[0]  # (B, 1, E)
            x = torch.cat([user, x], dim=1)                                     # (B, 1+L, E)
            mask = torch.cat([item_mask.new_ones(B, 1), item_mask], dim=1)         # (B, 1+L)
        x = self.drop(x)
        attn_mask = mask[:, None, None, :]                                      # (B, 1, 1, S)
        for block in self.encoder:
            x = block(x, attn_mask)
        return self.ln_encoder(x), mask

    # -- decoder --------------------------------------------------------------------------------
    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
               cache: DecoderCache | None = None, start_pos: int = 0) -> torch.Tensor:
        """Decoder hidden states (N, T, E) for tokens at positions start_pos..start_pos+T-1.

        decoder_input_ids (N, T) with N = B * g (g beams per user). Without a cache, start_pos
        must be 0 and the whole prefix is processed; with one, only the new tokens are.
        """
        T = decoder_input_ids.shape[1]
        positions = torch.arange(start_pos, start_pos + T, device=decoder_input_ids.device)
        x = self.drop(self.token_emb(decoder_input_ids) + self.decoder_pos(positions))
        causal = self.causal[start_pos:start_pos + T, :start_pos + T]           # (T, start_pos+T)
        for layer, block in enumerate(self.decoder):
            x = block(x, causal, memory, memory_mask, cache, layer, start_pos)
        return self.ln_decoder(x)

    def code_logits(self, hidden: torch.Tensor, digit: int) -> torch.Tensor:
        """hidden (N, E) -> (N, codebook_size) logits over digit `digit`'s codes."""
        start = self.config.sid_offset + digit * self.config.codebook_size
        return hidden @ self.token_emb.weight[start:start + self.config.codebook_size].T

    def logits(self, batch: dict) -> torch.Tensor:
        """Teacher-forced logits (B, 4, 256): position d scores digit d's codes only (a digit-d
        token is never right at position d', so the other 10k+ rows would only add cost)."""
        memory, memory_mask = self.encode(batch["user_ids"], batch["history_sid"])
        hidden = self.decode(batch["decoder_input_ids"], memory, memory_mask)   # (B, 5, E)
        c = self.config
        weight = self.token_emb.weight[c.sid_offset:].view(c.n_digit, c.codebook_size, c.n_embd)
        return torch.einsum("bte,tce->btc", hidden[:, :c.n_digit], weight)     # (B, 4, 256)

    def forward(self, batch: dict) -> torch.Tensor:
        """Mean cross-entropy of the 4 SID digits, teacher-forced."""
        logits = self.logits(batch)                                             # (B, 4, 256)
        # EOS always follows the 4th digit: nothing to learn there
        targets = batch["decoder_labels"][:, :self.config.n_digit] - self.digit_offsets  # (B, 4) codes
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    # -- inference interface (beam.py) ----------------------------------------------------------
    def new_cache(self, memory: torch.Tensor, memory_mask: torch.Tensor, n_beams: int) -> DecoderCache:
        """Preallocate self-attention K/V for B*n_beams rows; project cross K/V once per user."""
        c = self.config
        B = memory.shape[0]
        self_kv = memory.new_zeros(c.decoder_n_layer, 2, B * n_beams, c.n_head, 1 + c.n_digit, c.head_dim)
        cross_kv = [block.cross_attn.project_kv(memory) for block in self.decoder]  # (B, H, S, hd) x2
        return DecoderCache(self_kv, cross_kv, memory, memory_mask)

    def _prefix_tokens(self, codes: torch.Tensor, first_digit: int) -> torch.Tensor:
        """codes (N, T) of digits first_digit.. -> token ids (N, T)."""
        return codes + self.digit_offsets[first_digit:first_digit + codes.shape[1]]

    def step(self, prev_codes: torch.Tensor | None, cache: DecoderCache, digit: int) -> torch.Tensor:
        """One cached decoder step: logits (N, 256) over digit `digit`'s codes.

        prev_codes (N,) is the code chosen for digit-1 (None for digit 0, where BOS is fed).
        """
        N = cache.self_kv.shape[2]
        if digit == 0:
            tokens = torch.full((N, 1), BOS, dtype=torch.long, device=cache.self_kv.device)
        else:
            tokens = self._prefix_tokens(prev_codes[:, None], digit - 1)
        hidden = self.decode(tokens, cache.memory, cache.memory_mask, cache, start_pos=digit)
        return self.code_logits(hidden[:, -1], digit)

    def step_uncached(self, prefix_codes: torch.Tensor, memory: torch.Tensor,
                      memory_mask: torch.Tensor) -> torch.Tensor:
        """The same logits without a cache: run the decoder over [BOS] + prefix from scratch.

        prefix_codes (N, digit) -> logits (N, 256) over digit `digit`. memory is (B, S, E) with
        N a multiple of B; beam.py passes it already expanded per beam, as Hugging Face does.
        """
        N, digit = prefix_codes.shape
        bos = torch.full((N, 1), BOS, dtype=torch.long, device=memory.device)
        tokens = torch.cat([bos, self._prefix_tokens(prefix_codes, 0)], dim=1)  # (N, digit+1)
        hidden = self.decode(tokens, memory, memory_mask)
        return self.code_logits(hidden[:, -1], digit)

    @torch.no_grad()
    def generate(self, batch: dict, index, beam_size: int | None = None, n_return: int | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Top items per user, (B, n_return, 1) long, best first.

        Beams are constrained to prefixes of real SIDs in `index` (sid.SIDIndex or anything with
        prefix_mask/lookup), so every item exists and appears once; -1 pads a catalogue smaller
        than n_return. Every real history SID must be an item of `index` (ValueError otherwise).
        Call model.eval() first: dropout stays on in training mode.
        """
        beam_size = self.config.beam_size if beam_size is None else beam_size
        n_return = beam_size if n_return is None else n_return
        self.check_batch({"user_ids": batch["user_ids"], "history_sid": batch["history_sid"]})
        history_sid = batch["history_sid"].long()
        real = history_sid[:, :, 0] != PAD                                      # (B, L)
        items = index.lookup(history_sid[real] - self.digit_offsets)            # (n_real,)
        if (items < 0).any():
            row, slot = real.nonzero()[(items < 0).nonzero()[0, 0]].tolist()
            raise ValueError(f"history_sid[{row}, {slot}] = {history_sid[row, slot].tolist()}: "
                             "expected the SID of an item in the index, got one that no item has")
        # imported here only: the model itself does not depend on beam.py, which sits beside this
        # file, in a flat folder or in the same package (mypkg/rpg_ed.py and mypkg/beam.py)
        if __package__:
            from . import beam
        else:
            import beam
        result = beam.beam_search(self, batch, beam_size, n_return, index, use_cache=use_cache)
        return result.items[..., None]


# ----------------------------------------------------------------------------------------------
# python rpg_ed.py: every shape of one batch at the seed config (the README's walk-through)
# ----------------------------------------------------------------------------------------------

class BruteForceCatalogue:
    """The smallest constraint beam.py accepts: a catalogue of SIDs (n, n_digit) searched by brute
    force. sid.SIDIndex does the same with sorted keys and bitmaps; this one needs nothing else."""

    def __init__(self, codes: torch.Tensor, codebook_size: int):
        self.codes, self.codebook_size = codes, codebook_size

    def prefix_mask(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (N, l) codes -> (N, codebook_size) bool: next codes that lead to an item."""
        l = prefix.shape[1]
        match = (self.codes[None, :, :l] == prefix[:, None, :]).all(-1)           # (N, n)
        nxt = torch.nn.functional.one_hot(self.codes[:, l], self.codebook_size).bool()  # (n, K)
        return (match[:, :, None] & nxt[None]).any(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, n_digit) -> item ids (N,), -1 for a SID of no item."""
        same = (codes[:, None, :] == self.codes[None]).all(-1)                   # (N, n)
        return torch.where(same.any(1), same.float().argmax(1), -1)


def shape_demo(batch_size: int = 2, n_items: int = 1000) -> None:
    """Run one random batch through the seed-config model and print each tensor's shape."""
    torch.manual_seed(0)
    c = RPGEDConfig()
    model = RPG_ED(c).eval()
    B, L, K = batch_size, c.max_history, c.codebook_size
    catalogue = BruteForceCatalogue(torch.randint(0, K, (n_items, c.n_digit)), K)
    history_items = torch.randint(0, n_items, (B, L))
    history_sid = catalogue.codes[history_items] + model.digit_offsets         # token ids
    history_sid[0, :10] = PAD                                                  # user 0: 40 items, left-padded
    target = catalogue.codes[torch.randint(0, n_items, (B,))] + model.digit_offsets
    batch = {"user_ids": torch.randint(0, c.n_user_buckets, (B,)), "history_sid": history_sid,
             "decoder_input_ids": torch.cat([torch.full((B, 1), BOS), target], 1),
             "decoder_labels": torch.cat([target, torch.full((B, 1), EOS)], 1)}

    def show(name: str, t, note: str = "") -> None:
        print((f"  {name:<34} {list(t.shape)}".ljust(62) + note).rstrip())

    print(f"seed config: E = n_embd = {c.n_embd}, {c.n_head} heads of hd = {c.head_dim}, U = {c.n_user_buckets} "
          f"user buckets, V = {c.vocab_size} tokens, {model.num_parameters():,} parameters; B = {B}")
    print("encoder")
    show("user_ids", batch["user_ids"], "bucket ids in [0, U)")
    show("history_sid", history_sid, "token ids, oldest first, left-padded")
    with torch.no_grad():
        emb = model.token_emb(history_sid)
        show("token_emb(history_sid)", emb)
        show("history_compressor", model.history_compressor(emb), "mean of the 4 digits + residual MLP")
        memory, memory_mask = model.encode(batch["user_ids"], history_sid)
        show("memory (user token + items)", memory, f"after {c.encoder_n_layer} encoder blocks")
        show("memory_mask", memory_mask, f"user 0: {int(memory_mask[0].sum())} real positions")
        print("decoder (training, teacher forcing)")
        show("decoder_input_ids", batch["decoder_input_ids"], "[BOS, s0, s1, s2, s3]")
        hidden = model.decode(batch["decoder_input_ids"], memory, memory_mask)
        show("decode -> hidden", hidden, f"after {c.decoder_n_layer} decoder blocks")
        show("logits (one digit per position)", model.logits(batch), "hidden @ the digit's 256 token rows")
        show("decoder_labels", batch["decoder_labels"], "[s0, s1, s2, s3, EOS]")
        loss = model(batch)
        show("loss", loss, f"{loss.item():.3f} (about ln 256 = 5.545 at init)")
        print(f"generation (beam {c.beam_size}, cached)")
        cache = model.new_cache(memory, memory_mask, c.beam_size)
        show("cache.cross_kv: per layer K and V", cache.cross_kv[0][0], f"x 2 x {c.decoder_n_layer} layers, once per user")
        show("cache.self_kv", cache.self_kv, "(layers, K/V, B*beams, H, 5 positions, hd)")
        show("step(None, cache, digit=0)", model.step(None, cache, 0), "logits over digit 0's codes, every beam")
        show("generate -> items", model.generate(batch, catalogue), "top items per user, best first")


if __name__ == "__main__":
    if sys.argv[1:] in (["--help"], ["-h"]):
        print("python rpg_ed.py: every shape of one random batch at the seed config (it takes no flags)")
    elif sys.argv[1:]:
        raise SystemExit(f"error: python rpg_ed.py takes no flags (--help says what it does), got {sys.argv[1]!r}")
    else:
        shape_demo()
