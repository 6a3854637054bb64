"""The model: plain PyTorch, nothing here knows Lightning, the data or the tokenizer.

    config.py    GPTConfig, the architecture as data, and its cost (model_size: parameters, FLOPs per token)
    moe.py       a mixture-of-experts MLP (model.mlp moe): router, grouped experts, load balancing
    gpt.py       the GPT (GPT-2 and Llama-style blocks are settings of one class): tokens -> logits, generate()
    loss.py      the training objective: plain or fused (output layer + cross-entropy in one step)
    sampling.py  a prompt -> sampled text (training's samples and lm-pretrain-generate)
    scoring.py   how likely a continuation is after a context (multiple-choice benchmarks)

    from lm_pretrain.model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=2048))
"""

from lm_pretrain.model.config import GPTConfig, model_size

__all__ = ["GPT", "GPTConfig", "model_size"]


def __getattr__(name: str):
    # GPT imports torch: only when asked for, so that what only reads configs (lm-pretrain-sizes,
    # GPTConfig) stays quick
    if name == "GPT":
        from lm_pretrain.model.gpt import GPT

        return GPT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
