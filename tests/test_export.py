"""Hugging Face export: the exported model gives the same logits as ours, for both families."""

import re

import pytest
import torch

from helpers import cli_error, tiny_checkpoint
from lm_pretrain.utils.errors import UserError

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=50257, block_size=32, n_layer=2, n_head=4, n_embd=64, warmup_steps=1)
FAMILIES = {
    "gpt2": dict(),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False,
                  rope_theta=500000.0),
}


def checkpoint(tmp_path, **hparams):
    """A checkpoint of a model trained for a few steps (so no weight is at its initial value)."""
    return tiny_checkpoint(tmp_path / "model.ckpt", steps=3, **{**TINY, **hparams})


@pytest.mark.parametrize("name", FAMILIES)
def test_exported_model_matches(name, tmp_path):
    from lm_pretrain.commands.export import main

    module, ckpt = checkpoint(tmp_path, **FAMILIES[name])
    main(["--ckpt_path", str(ckpt), "--output", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[name]
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    tokens = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        ours, theirs = module.eval()(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_export_refuses_what_hf_cannot_hold(tmp_path):
    from lm_pretrain.commands.export import family
    from lm_pretrain.model import GPTConfig

    with pytest.raises(UserError, match="no Hugging Face class"):
        family(GPTConfig(position="rope"))
    with pytest.raises(UserError, match="bias"):
        family(GPTConfig(bias=False))


def test_export_cli_errors(tmp_path, capsys):
    from lm_pretrain.commands.export import main

    assert "does not exist" in cli_error(main, ["--ckpt_path", str(tmp_path / "none.ckpt"), "--output",
                                                str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()
    (tmp_path / "a-file").write_text("x")
    assert "--output" in cli_error(main, ["--ckpt_path", "x", "--output", str(tmp_path / "a-file" / "hf")], capsys)


@pytest.mark.parametrize("tokenizer,eot", [("gpt2", 50256), ("cl100k_base", 100257)])
def test_export_marks_the_tokenizers_end_of_text_as_bos_and_eos(tokenizer, eot):
    from lm_pretrain.commands.export import to_hf
    from lm_pretrain.model import GPT, GPTConfig

    config = GPTConfig(vocab_size=100352, block_size=16, n_layer=1, n_head=2, n_embd=16, position="rope",
                       norm="rmsnorm", mlp="swiglu", bias=False)
    from lm_pretrain.tokenizer.encoding import eot_id

    hf = to_hf(config, GPT(config).state_dict(), eot_id(tokenizer))
    assert hf.config.bos_token_id == hf.config.eos_token_id == eot


def test_a_full_disk_is_one_line_and_keeps_the_previous_export(small_disk, tmp_path, capsys):
    from lm_pretrain.commands.export import main

    _, ckpt = tiny_checkpoint(tmp_path / "x.ckpt", steps=1, vocab_size=50257)  # ~6 MiB of weights
    (small_disk / "hf").mkdir()
    (small_disk / "hf" / "config.json").write_text("{}")  # an earlier export
    line = cli_error(main, ["--ckpt_path", str(ckpt), "--output", str(small_disk / "hf"), "--overwrite"], capsys)
    assert line.startswith(f"error: no space left to write {small_disk / 'hf'}: it needs ~") and \
        re.search(r"[\d,]+ [KM]iB are free there; the previous hf is kept$", line), line
    assert [p.name for p in small_disk.iterdir()] == ["hf"] and (small_disk / "hf" / "config.json").read_text() == "{}"


def test_export_never_writes_over_its_checkpoint(tmp_path, capsys):
    from lm_pretrain.commands.export import main

    _, ckpt = checkpoint(tmp_path)
    saved = ckpt.read_bytes()
    (tmp_path / "link").symlink_to(tmp_path)
    for output, relation in ((tmp_path, "contains"), (ckpt, "is"), (tmp_path / "link", "contains")):
        for overwrite in ([], ["--overwrite"]):
            line = cli_error(main, ["--ckpt_path", str(ckpt), "--output", str(output), *overwrite], capsys)
            assert line.startswith(f"error: --output {output} {relation} {ckpt}") and "(--ckpt_path)" in line, line
    sharded = tmp_path / "sharded.ckpt"  # a sharded run's checkpoint is a folder: nothing may go inside it
    sharded.mkdir()
    line = cli_error(main, ["--ckpt_path", str(sharded), "--output", str(sharded / "hf"), "--overwrite"], capsys)
    assert line.startswith(f"error: --output {sharded / 'hf'} lies inside {sharded}"), line
    assert ckpt.read_bytes() == saved and sorted(p.name for p in tmp_path.iterdir()) == ["link", "model.ckpt",
                                                                                        "sharded.ckpt"]


def test_ctrl_c_while_exporting_leaves_the_earlier_export_and_nothing_else(tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils

    from helpers import interrupted_at
    from lm_pretrain.commands.export import main

    _, ckpt = checkpoint(tmp_path)
    main(["--ckpt_path", str(ckpt), "--output", str(tmp_path / "hf")])
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    interrupted_at(monkeypatch, transformers.modeling_utils.PreTrainedModel, "save_pretrained", main,
                   ["--ckpt_path", str(ckpt), "--output", str(tmp_path / "hf"), "--overwrite"], capsys)
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.ckpt"]  # no partial folder
