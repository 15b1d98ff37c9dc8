"""Checks of a forward pass's inputs: shapes and dtypes before any work, values on CPU
at once and on CUDA from a summary read once the forward pass is queued (a read of the
values themselves would stall it until the GPU caught up)."""

from __future__ import annotations

import torch


def check_shapes(input_ids, attention_mask, token_type_ids) -> None:
    """Raise ValueError naming the argument whose shape or dtype does not fit the model."""
    if input_ids is None:
        raise ValueError("LAMModel needs input_ids")
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor of shape (batch, length), "
                         f"got {tuple(input_ids.shape)} {input_ids.dtype}")
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}")


def value_summary(input_ids, attention_mask, token_type_ids) -> torch.Tensor:
    """What check_values reads, as one tensor: the smallest and largest id, mask value
    and token type, and whether any mask is left-padded."""
    # aminmax: one reduction for both ends (a summary is part of every forward on CUDA).
    return torch.stack([
        *torch.aminmax(input_ids.long()), *torch.aminmax(attention_mask.long()),
        (attention_mask[:, 1:] > attention_mask[:, :-1]).any().long(), *torch.aminmax(token_type_ids.long()),
    ])


def check_input_values(config, input_ids, attention_mask, token_type_ids) -> tuple | None:
    """Raise ValueError naming the argument whose values do not fit the model of ``config``.

    On CPU the values are checked here; on a GPU their summary is returned instead (see
    summary_to_host), for ``check_values`` once the forward pass is queued."""
    if not input_ids.numel():
        return None
    stats = value_summary(input_ids, attention_mask, token_type_ids)
    if not stats.is_cuda:
        check_values(config, stats)
        return None
    return summary_to_host(stats)


def summary_to_host(stats: torch.Tensor) -> tuple:
    """The summary copied to the host without waiting, and the event that marks the copy done."""
    host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
    host.copy_(stats, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def check_values(config, stats: torch.Tensor, done: torch.cuda.Event | None = None) -> None:
    """The checks of check_input_values, from its summary of the values."""
    if done is not None:
        done.synchronize()  # the copy was queued before the forward pass: long done
    low, high, mask_low, mask_high, left_padded, type_low, type_high = stats.tolist()
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids holds id {bad}, outside the vocabulary [0, {config.vocab_size})")
    if mask_low < 0 or mask_high > 1:
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if left_padded:
        raise ValueError(
            "attention_mask must be right-padded (ones, then zeros): LAM reads tokens in order, "
            "so left padding would shift every chunk; set tokenizer.padding_side = 'right'"
        )
    if type_low < 0 or type_high >= config.type_vocab_size:
        raise ValueError(f"token_type_ids must lie in [0, {config.type_vocab_size})")
