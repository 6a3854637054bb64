"""Text in, text out: a prompt is encoded, continued by the model (GPT.generate, with its KV cache)
and decoded. Used by the samples printed during training (callbacks.TextSamples) and by
`lm-pretrain-generate`.

Sampling always runs eagerly (torch.compiler's "force_eager" stance), also when training compiles
the model's step or its blocks (under FSDP): a graph traced in generation's shapes and grad mode
would be a recompile, and enough of them leave the training graph behind (Dynamo's recompile limit).
"""

import torch


def sample(model, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8, top_k: int | None = 200,
           seed: int | None = None, top_p: float | None = None, stop_at_eot: bool = True) -> str:
    """The prompt followed by up to `max_new_tokens` sampled tokens, decoded, for a LanguageModel
    (`model.model` is its GPT); sampling stops at the end-of-text token when stop_at_eot."""
    enc = model.encoding
    ids = enc.encode_ordinary(prompt) or [enc.eot_token]  # an empty prompt starts a new document
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=model.device)
    with torch.compiler.set_stance("force_eager"):
        out = model.model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator, vocab_limit=enc.n_vocab,
                                   stop_token=enc.eot_token if stop_at_eot else None)[0].tolist()
    if not prompt:
        out = out[1:]
    if stop_at_eot and out and out[-1] == enc.eot_token and len(out) > len(ids):
        out = out[:-1]
    return enc.decode(out)
