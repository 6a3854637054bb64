"""How likely a model finds a continuation after a context: the scores of ranked classification.

A multiple-choice question is answered by the choice whose continuation gets the highest sum of
log-probabilities, each token predicted from the context and the continuation's tokens before it
(lm-evaluation-harness's "loglikelihood" requests; OLMo's and nanochat's in-loop evaluations do the
same). The rules here are the harness's, so that the numbers agree with it on the same model
(tests/test_downstream.py): the context's trailing spaces move to the continuation, the
continuation's tokens are those the whole text has after the context's tokens, an empty context is
the end-of-text token, and a sequence longer than the model's window loses its first tokens.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                empty_context: int) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of a request, as the harness cuts them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [empty_context], encode(continuation)
    whole, before = encode(context + continuation), encode(context)
    return before, whole[len(before):]


def continuation_logprobs(model: Callable[[torch.Tensor], torch.Tensor], pairs: list[tuple[list[int], list[int]]],
                          block_size: int, batch_size: int, device: torch.device | str = "cpu",
                          pad_batches_to: int | None = None) -> list[float]:
    """Sum of log p(continuation token | everything before it) for each (context, continuation) pair
    of token lists, in float32 (continuation_scores without the greedy flags)."""
    return [logprob for logprob, _ in continuation_scores(model, pairs, block_size, batch_size, device, pad_batches_to)]


@torch.no_grad()
def continuation_scores(model: Callable[[torch.Tensor], torch.Tensor], pairs: list[tuple[list[int], list[int]]],
                        block_size: int, batch_size: int, device: torch.device | str = "cpu",
                        pad_batches_to: int | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation token | everything before it), whether every continuation token was
    the likeliest) for each (context, continuation) pair of token lists, in float32. `model` maps ids
    (B, T) to logits (B, T, V). Sequences longer than block_size + 1 keep their last tokens (a
    continuation longer than block_size, its last block_size). Batched longest first (little
    padding, and a batch too large for memory fails at once; padding goes on the right, where causal
    attention keeps it from the real positions). pad_batches_to runs that many forward passes in
    all, the last ones on a dummy row (every process of a sharded model must run as many)."""
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    for _ in range(len(batches), pad_batches_to or 0):
        batches.append([])
    for batch in batches:
        rows, spans = [], []
        for i in batch:
            context, continuation = pairs[i]
            continuation = list(continuation)[-block_size:]
            tokens = (list(context) + continuation)[-(block_size + 1):]
            rows.append(tokens[:-1])
            spans.append((len(tokens) - 1 - len(continuation), continuation))
        if not rows:  # a pass for the others' sake
            model(torch.zeros(1, 1, dtype=torch.long, device=device))
            continue
        width = max(map(len, rows))
        x = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=device)
        logits = model(x)
        totals, greedy = [], []
        for row, (first, continuation) in enumerate(spans):
            logprobs = F.log_softmax(logits[row, first:first + len(continuation)].float(), dim=-1)
            target = torch.tensor(continuation, device=logprobs.device)
            totals.append(logprobs.gather(1, target[:, None]).sum())
            greedy.append((logprobs.argmax(dim=-1) == target).all())
        # read back once per batch, not once per sequence
        for i, total, likeliest in zip(batch, torch.stack(totals).tolist(), torch.stack(greedy).tolist()):
            results[i] = (total, likeliest)
    return results
