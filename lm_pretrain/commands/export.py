"""Export a checkpoint to a Hugging Face `transformers` model folder.

    lm-pretrain-export --ckpt_path PATH --output DIR

GPT-2-style models become `GPT2LMHeadModel`, Llama-style ones `LlamaForCausalLM`, Llama-style mixtures
of experts `MixtralForCausalLM`: config.json and
model.safetensors, plus the tokenizer: GPT-2's files (vocab.json, merges.txt) when the model uses
the gpt2 tokenizer, a tokenizer.json of the same BPE when it uses a tokenizer of your own. Load the result with `AutoModelForCausalLM.from_pretrained(DIR)`.
`transformers` is needed here (and in the tests), not for training.
"""

import json
import shutil
import sys
from pathlib import Path


from lm_pretrain.commands.parsing import call, command_parser
from lm_pretrain.utils.errors import UserError, exit_on_user_error
from lm_pretrain.utils.extras import require
from lm_pretrain.utils.files import (check_can_create, done_with, full_disk_is_one_line, partial_path, publish,
                               refuse_output_over_inputs, remove_orphans)
from lm_pretrain.model.config import GPTConfig
from lm_pretrain.tokenizer.encoding import eot_id


def family(config: GPTConfig) -> str:
    """"gpt2", "llama" or "mixtral": which Hugging Face class can hold this architecture exactly."""
    if config.qk_norm or config.logit_softcap is not None:
        raise UserError("no Hugging Face GPT-2, Llama or Mixtral class has QK-norm or logit soft-capping; "
                        "this model cannot be exported")
    if config.mlp == "moe":
        if (config.position, config.norm, config.bias) != ("rope", "rmsnorm", False):
            raise UserError("a mixture of experts exports as MixtralForCausalLM, which needs position rope, norm "
                            "rmsnorm and bias false; this model cannot be exported")
        if config.n_shared_experts or not config.router_renormalize:
            raise UserError("MixtralForCausalLM has no shared experts and renormalises the chosen experts' weights: "
                            "a model with n_shared_experts or router_renormalize false cannot be exported")
        return "mixtral"
    if (config.position, config.norm, config.mlp) == ("learned", "layernorm", "gelu"):
        if not config.bias or config.n_kv_head != config.n_head:
            raise UserError("GPT2LMHeadModel needs bias: true and n_kv_head = n_head; this model cannot be exported")
        return "gpt2"
    if (config.position, config.norm, config.mlp) == ("rope", "rmsnorm", "swiglu"):
        return "llama"
    raise UserError(f"no Hugging Face class matches position={config.position}, norm={config.norm}, "
                    f"mlp={config.mlp}; export supports GPT-2 (learned/layernorm/gelu) and Llama (rope/rmsnorm/swiglu)")


def gpt2_state(config: GPTConfig, state: dict) -> tuple[dict, dict]:
    """(HF config kwargs, HF state dict) for GPT2LMHeadModel. HF's GPT-2 uses Conv1D layers, whose
    weights are the transpose of nn.Linear's."""
    import torch

    hf = {"transformer.wte.weight": state["wte.weight"], "transformer.wpe.weight": state["wpe.weight"],
          "transformer.ln_f.weight": state["ln_f.weight"], "transformer.ln_f.bias": state["ln_f.bias"],
          "lm_head.weight": state["lm_head.weight"]}
    names = {"ln_1": "ln_1", "attn.proj": "attn.c_proj", "ln_2": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for i in range(config.n_layer):
        ours = f"blocks.{i}."
        for mine, theirs in names.items():
            weight = state[f"{ours}{mine}.weight"]
            hf[f"transformer.h.{i}.{theirs}.weight"] = weight if mine.startswith("ln") else weight.t()
            hf[f"transformer.h.{i}.{theirs}.bias"] = state[f"{ours}{mine}.bias"]
        # HF's one c_attn holds our q, k and v, one after the other
        hf[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([state[f"{ours}attn.{x}.weight"] for x in "qkv"]).t()
        hf[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat([state[f"{ours}attn.{x}.bias"] for x in "qkv"])
    kwargs = dict(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                  n_layer=config.n_layer, n_head=config.n_head, n_inner=config.mlp_hidden,
                  activation_function="gelu_new", layer_norm_epsilon=config.norm_eps, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=config.tie_embeddings,
                  architectures=["GPT2LMHeadModel"])
    return kwargs, hf


def llama_state(config: GPTConfig, state: dict) -> tuple[dict, dict]:
    """(HF config kwargs, HF state dict) for LlamaForCausalLM: one matrix of HF's for each of ours (the
    attention's only, for a mixture of experts: mixtral_state adds its own)."""
    hd = config.head_dim
    hf = {"model.embed_tokens.weight": state["wte.weight"], "model.norm.weight": state["ln_f.weight"],
          "lm_head.weight": state["lm_head.weight"]}
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        hf[theirs + "input_layernorm.weight"] = state[ours + "ln_1.weight"]
        hf[theirs + "post_attention_layernorm.weight"] = state[ours + "ln_2.weight"]
        for kind in ("weight", "bias") if config.bias else ("weight",):
            for mine, hf_name in (("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"),
                                  ("attn.v", "self_attn.v_proj"), ("attn.proj", "self_attn.o_proj"),
                                  *(() if config.mlp == "moe" else (("mlp.gate", "mlp.gate_proj"), ("mlp.fc", "mlp.up_proj"),
                                                                    ("mlp.proj", "mlp.down_proj")))):
                hf[theirs + f"{hf_name}.{kind}"] = state[ours + f"{mine}.{kind}"]
    kwargs = dict(vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.mlp_hidden,
                  num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                  num_key_value_heads=config.n_kv_head, head_dim=hd, max_position_embeddings=config.block_size,
                  rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, hidden_act="silu",
                  attention_bias=config.bias, mlp_bias=config.bias, tie_word_embeddings=config.tie_embeddings,
                  architectures=["LlamaForCausalLM"])
    return kwargs, hf


def mixtral_state(config: GPTConfig, state: dict) -> tuple[dict, dict]:
    """(HF config kwargs, HF state dict) for MixtralForCausalLM: Llama's attention, and per block the
    router (`gate`) and the experts' stacked matrices, gate and up in one (transformers 5's layout;
    save_pretrained writes what every version reads)."""
    import torch

    kwargs, hf = llama_state(config, state)
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.mlp.", f"model.layers.{i}.mlp."
        if state[ours + "expert_bias"].any():
            raise UserError("this model was trained with model.router_bias_rate: its experts are chosen with a "
                            "bias, which MixtralForCausalLM does not have; it cannot be exported")
        hf[theirs + "gate.weight"] = state[ours + "router.weight"]
        hf[theirs + "experts.gate_up_proj"] = torch.cat([state[ours + "gate"], state[ours + "up"]], dim=1)
        hf[theirs + "experts.down_proj"] = state[ours + "down"]
    kwargs.update(num_local_experts=config.n_experts, num_experts_per_tok=config.top_k, sliding_window=None,
                  router_aux_loss_coef=config.router_aux_loss, router_jitter_noise=0.0,
                  architectures=["MixtralForCausalLM"])
    for name in ("attention_bias", "mlp_bias"):
        kwargs.pop(name)
    return kwargs, hf


def to_hf(config: GPTConfig, state: dict, eot_token_id: int = 50256):
    """A transformers model holding the same weights (float32, eval mode); the tokenizer's
    end-of-text id is its bos and eos."""
    transformers = require("transformers", "export", "exporting to Hugging Face")

    kind = family(config)
    kwargs, hf_state = {"gpt2": gpt2_state, "llama": llama_state, "mixtral": mixtral_state}[kind](config, state)
    # Documents were separated by the end-of-text token in training: it starts and ends them here.
    kwargs.update(bos_token_id=eot_token_id, eos_token_id=eot_token_id)
    architectures = kwargs.pop("architectures")
    config_class, model_class = {"gpt2": ("GPT2Config", "GPT2LMHeadModel"), "llama": ("LlamaConfig", "LlamaForCausalLM"),
                                 "mixtral": ("MixtralConfig", "MixtralForCausalLM")}[kind]
    hf_config = getattr(transformers, config_class)(**kwargs)
    hf_config.architectures = architectures
    model = getattr(transformers, model_class)(hf_config)
    hf_state = {k: v.detach().float().contiguous() for k, v in hf_state.items()}
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight") and ".attn.bias" not in k
               and "masked_bias" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping is incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_embeddings:
        model.tie_weights()
    return model.eval()


def write_own_tokenizer(output: Path, raw: dict) -> None:
    """A tokenizer file of ours as a Hugging Face fast tokenizer (tokenizer.json and its config):
    byte-level BPE with the same ranks, split pattern and <|endoftext|>, so AutoTokenizer encodes
    every text to the same ids as tiktoken does with our file."""
    transformers = require("transformers", "export", "exporting a tokenizer")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from lm_pretrain.tokenizer import bpe

    parsed = bpe.parse(raw, "the checkpoint's tokenizer")
    ranks = {token: i for i, token in enumerate(parsed["ranks"])}
    char = bpe.bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(char[b] for b in token)

    tokenizer = Tokenizer(models.BPE(vocab={text(t): i for t, i in ranks.items()},
                                     merges=[(text(a), text(b)) for a, b in bpe.merges(ranks)],
                                     ignore_merges=True))  # a piece that is a token is that token, as in tiktoken
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(parsed["pattern"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    eot = bpe.EOT_TEXT
    tokenizer.add_special_tokens([AddedToken(eot, special=True, normalized=False)])  # id len(ranks)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=eot, eos_token=eot,
                                                unk_token=eot, model_max_length=2**30)
    fast.save_pretrained(output)


def write_tokenizer(output: Path) -> None:
    """GPT-2's vocab.json and merges.txt, and the config that makes them a GPT2TokenizerFast."""
    from lm_pretrain.utils import assets

    files = assets.gpt2_vocab_files()
    shutil.copy(files["encoder.json"], output / "vocab.json")
    shutil.copy(files["vocab.bpe"], output / "merges.txt")
    eot = "<|endoftext|>"
    (output / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
        "add_prefix_space": False, "model_max_length": 1024}, indent=2) + "\n")
    (output / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": eot, "eos_token": eot, "unk_token": eot}, indent=2) + "\n")


def export(ckpt_path: str, output: str, overwrite: bool = False) -> Path:
    """Export a checkpoint to a Hugging Face transformers model folder (config.json, model.safetensors).

    Args:
        ckpt_path: a checkpoint written by train.py (a file, or the folder of a sharded run).
        output: the folder to create.
        overwrite: replace OUTPUT if it exists (only once the new one is complete); never the checkpoint.
    """
    from lm_pretrain.training.checkpoints import tensor_bytes  # here, not above: --help stays quick without Lightning
    from lm_pretrain.training.module import LanguageModel

    refuse_output_over_inputs(output, {"--ckpt_path": ckpt_path})
    output = Path(output)
    if output.exists() and not overwrite:
        raise UserError(f"output {output} already exists; pass --overwrite to replace it")
    check_can_create(output, "--output")
    for name in ("transformers", "safetensors"):  # before the checkpoint is loaded
        require(name, "export", "lm-pretrain-export")
    module = LanguageModel.from_checkpoint(ckpt_path)
    tokenizer = module.tokenizer_record
    own = tokenizer.get("tokenizer_file")
    model = to_hf(module.config, module.model.state_dict(), module.encoding.eot_token if own else eot_id(tokenizer["tokenizer"]))
    staging = partial_path(output)
    shutil.rmtree(staging, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(output.parent)  # what exports killed before left
    try:
        with full_disk_is_one_line(output, needed_bytes=tensor_bytes(model.state_dict())):
            model.save_pretrained(staging, safe_serialization=True)
            if own:
                write_own_tokenizer(staging, own)
            elif tokenizer["tokenizer"] == "gpt2":
                try:
                    write_tokenizer(staging)
                except UserError as err:
                    print(f"warning: tokenizer files not written ({err})", file=sys.stderr)
            publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        done_with(staging)
    return output


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    out = call(command_parser("lm-pretrain-export", export), export, argv)
    print(f"exported to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
