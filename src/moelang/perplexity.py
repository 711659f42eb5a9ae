"""Perplexity of a causal LM on one split of one language's token file: the evaluation stage's
``perplexity.parquet`` (the test split) and the adaptation stage's learning-rate selection (the dev
split) and reported test perplexity (a module of its own so that the model image, which has no lm-eval,
can import it).

Every chunk of the split (at most ``seq_len`` - 1 tokens, within documents, up to ``tokens_per_language``)
is preceded by the EOS token, so that every real token is predicted from a context; padding is never
scored. Returns ``n_tokens`` (tokens scored), ``nll`` (mean negative log-likelihood, nats) and
``perplexity`` (exp of it).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from moelang.io import progress
from moelang.options import EvaluationOptions


@torch.no_grad()
def perplexity(model, token_file: str | Path, eos_id: int, options: EvaluationOptions | dict, split: str) -> dict:
    """Perplexity on the ``split`` documents (``dev`` or ``test``, :mod:`moelang.splits`) of ``token_file``."""
    options = EvaluationOptions.coerce(options)
    from moelang.routing import heldout_chunks, length_batches

    device = next(model.parameters()).device
    chunks = heldout_chunks(token_file, options.seq_len - 1, options.tokens_per_language, split=split)
    chunks = [np.concatenate([[eos_id], c]) for c in chunks]  # every real token gets a context
    total_nll, total = 0.0, 0
    for ids, mask in progress(length_batches(chunks, options.batch_tokens, eos_id), desc="perplexity", unit=" batches"):
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        valid = mask[:, 1:].bool()
        # one sequence at a time in fp32: a batch of 8,192 tokens over Qwen's 151,936-token vocabulary
        # is 5 GB of fp32 logits, and log_softmax would make a second copy
        for row in range(ids.shape[0]):
            logp = torch.log_softmax(logits[row, :-1].float(), dim=-1).gather(-1, ids[row, 1:, None]).squeeze(-1)
            total_nll -= float(logp[valid[row]].double().sum())
        total += int(valid.sum())
    return {"n_tokens": total, "nll": total_nll / total, "perplexity": math.exp(total_nll / total)}
