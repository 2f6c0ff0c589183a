"""Tiny causal language models built from configs, a plain-PyTorch training loop, and generation.

Training minimises the causal-LM loss on token blocks x = (x_1..x_T):
    L(θ) = −(1/|M|) Σ_{t∈M} log p_θ(x_t | x_<t),  M = {t ≥ 2 : x_t is not padding},
which is the loss transformers computes from `labels` (shifted inside the model, label −100 ignored).
Generation is transformers' `generate` (KV cache on by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
)

Family = Literal["gpt2", "llama"]


def build_tiny_lm(
    vocab_size: int,
    family: Family = "gpt2",
    n_layer: int = 2,
    d_model: int = 128,
    n_head: int = 4,
    max_positions: int = 256,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    dropout: float = 0.0,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM (`GPT2LMHeadModel` or `LlamaForCausalLM`), seeded locally.

    Llama gets a SwiGLU MLP of width 4·d and full multi-head attention (num_key_value_heads = n_head).
    """
    special = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_positions,
            n_embd=d_model,
            n_layer=n_layer,
            n_head=n_head,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            **special,
        )
        model_class = GPT2LMHeadModel
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            intermediate_size=4 * d_model,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=n_head,
            max_position_embeddings=max_positions,
            attention_dropout=dropout,
            **special,
        )
        model_class = LlamaForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}; expected 'gpt2' or 'llama'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return with_causal_lm_loss(model)


def with_causal_lm_loss(model: PreTrainedModel) -> PreTrainedModel:
    """Name transformers' causal-LM loss explicitly: ``GPT2LMHeadModel`` matches no entry of its loss
    map and would warn at the first loss before falling back to this same loss."""
    model.loss_type = "ForCausalLM"
    return model


def pad_rows(rows: Sequence[Sequence[int]], pad: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token rows padded with ``pad`` to the longest row: on the right
    (training, scoring) or, with ``left``, on the left (prompts for batched generation)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols], mask[i, cols] = torch.tensor([int(t) for t in row], dtype=torch.long), 1
    return ids, mask


def strip_generated(tokens: Sequence[int], eos: int, pad: int) -> list[int]:
    """A generated row up to (without) its first EOS, pad tokens removed."""
    tokens = list(tokens)
    tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
    return [t for t in tokens if t != pad]


def token_blocks(token_ids: Sequence[int], block_size: int) -> torch.LongTensor:
    """Cut a token stream into non-overlapping blocks of `block_size` (the remainder is dropped)."""
    n_blocks = len(token_ids) // block_size
    if n_blocks == 0:
        raise ValueError(f"{len(token_ids)} tokens do not fill one block of {block_size}")
    return torch.tensor(token_ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def causal_lm_loss(
    model: PreTrainedModel, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy; positions with attention_mask = 0 are excluded from the loss."""
    labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def train_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    max_grad_norm: float | None = None,
) -> float:
    """One optimizer step on the causal-LM loss of a batch; returns the loss before the step.

    ``model`` may be wrapped in DDP (the batch goes to its parameters' device).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    loss = causal_lm_loss(model, input_ids.to(device), _to(attention_mask, device))
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


def train_epoch(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    blocks: torch.LongTensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    max_grad_norm: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> float:
    """One pass over `blocks` (N, T) in shuffled mini-batches; returns the mean batch loss.

    ``attention_mask`` (N, T) marks the positions of each row that count (padding excluded).
    """
    order = torch.randperm(len(blocks), generator=generator)
    losses = []
    for start in range(0, len(blocks), batch_size):
        batch = order[start : start + batch_size]
        mask = None if attention_mask is None else attention_mask[batch]
        losses.append(train_step(model, optimizer, blocks[batch], mask, max_grad_norm))
    return sum(losses) / len(losses)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor | Sequence[int],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    logits_processors: Sequence[LogitsProcessor] = (),
    attention_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    seed: int | None = None,
) -> torch.LongTensor:
    """Greedy (`do_sample=False`) or temperature/top-p sampled continuation via `model.generate`.

    Returns only the new tokens, shape (batch, ≤ max_new_tokens); generation stops early at the
    model's EOS token (finished rows are filled with the pad token). Custom `logits_processors`
    run before temperature and top-p (transformers' order). `seed` fixes the sampling RNG locally.
    """
    input_ids = torch.as_tensor(input_ids, dtype=torch.long, device=model.device)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else {}
    model.eval()
    devices = [] if model.device.type == "cpu" else [model.device]
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            logits_processor=LogitsProcessorList(logits_processors),
            use_cache=use_cache,
            pad_token_id=model.config.pad_token_id,
            **sampling,
        )
    return output[:, input_ids.shape[1] :]


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
