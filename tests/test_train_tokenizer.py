"""lm-pretrain-tokenizer, and a tokenizer of your own through every command: prepare, train,
samples, generate, resume, init_from, export to transformers and evaluate, with the file itself gone
once the data is prepared (the dataset and the checkpoints carry their copies)."""

import json
import pytest
import torch

from helpers import ROOT, cli_error, run_cli, train_args
from lm_pretrain.tokenizer import bpe
from lm_pretrain.data.prepare import prepare, split_documents
from lm_pretrain.data.readers import find_inputs
from lm_pretrain.tokenizer.encoding import get_tokenizer
from lm_pretrain.commands.tokenizer import main
from lm_pretrain.data.train_tokenizer import train_tokenizer

VOCAB = 300  # the test corpus has few distinct words: ~350 ids are all it can give


@pytest.fixture(scope="module")
def own(corpus, tmp_path_factory) -> dict:
    """A 300-token BPE trained on the test corpus, the corpus prepared with it (val 20 %), then the
    tokenizer file deleted."""
    folder = tmp_path_factory.mktemp("own")
    summary = train_tokenizer(str(folder / "tok.json"), VOCAB, inputs=[str(corpus[0])], val_fraction=0.2)
    raw = json.loads((folder / "tok.json").read_text())
    data = folder / "data"
    prepare(find_inputs([str(corpus[0])]), data, val_fraction=0.2, tokenizer=str(folder / "tok.json"), workers=2)
    (folder / "tok.json").unlink()  # nothing after prepare may need it
    return {"folder": folder, "summary": summary, "raw": raw, "data": data}


def test_the_tokenizer_holds_out_the_documents_prepare_puts_into_validation(own, corpus):
    raw, docs = own["raw"], [d for d in corpus[1] if d.strip()]
    is_val = split_documents(len(docs), 0.2, 0)
    assert raw["trained_on"]["documents"] == int((~is_val).sum()) == own["summary"]["documents"]
    assert raw["trained_on"]["characters"] == sum(len(d) for d, v in zip(docs, is_val) if not v)
    assert own["summary"]["vocab_size"] == VOCAB and len(raw["ranks"]) == VOCAB - 1
    assert 1.5 < own["summary"]["val_bytes_per_token"] < 10  # measured on the held-out documents
    meta = json.loads((own["data"] / "metadata.json").read_text())
    assert meta["tokenizer"] == "tok" and meta["vocab_size"] == VOCAB and meta["eot_id"] == VOCAB - 1
    assert meta["tokenizer_sha256"] == bpe.digest(raw) == own["summary"]["sha256"] and meta["tokenizer_file"] == raw
    assert meta["splits"]["val"]["documents"] == int(is_val.sum())


def test_a_corpus_too_small_for_the_vocabulary_gives_what_it_can_and_says_so(corpus, tmp_path, caplog):
    summary = train_tokenizer(str(tmp_path / "t.json"), 5000, inputs=[str(corpus[0])])
    assert 258 < summary["vocab_size"] < 5000 == summary["vocab_size_asked"]
    assert get_tokenizer(str(tmp_path / "t.json")).n_vocab == summary["vocab_size"]
    assert any("set model.vocab_size" in r.getMessage() and str(summary["vocab_size"]) in r.getMessage()
               for r in caplog.records)


def test_a_character_budget_is_shared_across_the_inputs(corpus, tmp_path):
    summary = train_tokenizer(str(tmp_path / "t.json"), 300, inputs=[str(corpus[0])], max_chars=20_000,
                              hold_out_val=False)
    assert 19_000 <= summary["characters"] <= 20_000  # the budget, nearly all used
    raw = json.loads((tmp_path / "t.json").read_text())
    assert raw["trained_on"]["held_out_val"] is None
    # 13 inputs (12 .txt and one .jsonl): each gets its share, so more documents than the first input's
    assert summary["documents"] >= 13


def test_errors_are_one_line(corpus, tmp_path, capsys):
    corpus_dir = str(corpus[0])
    assert "at least 258" in cli_error(main, [corpus_dir, "--vocab_size", "100", "--output", str(tmp_path / "t.json")], capsys)
    assert "give INPUTs" in cli_error(main, ["--vocab_size", "300", "--output", str(tmp_path / "t.json")], capsys)
    (tmp_path / "t.json").write_text("{}")
    assert "--overwrite" in cli_error(main, [corpus_dir, "--vocab_size", "300", "--output", str(tmp_path / "t.json")], capsys)
    assert "is a folder" in cli_error(main, [corpus_dir, "--vocab_size", "300", "--output", str(tmp_path)], capsys)
    assert "--trainer" in cli_error(main, [corpus_dir, "--vocab_size", "300", "--output", str(tmp_path / "u.json"),
                                           "--trainer", "sentencepiece"], capsys)
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.txt").write_text("just one document")
    assert "--hold_out_val false" in cli_error(main, [str(one), "--vocab_size", "300", "--output", str(tmp_path / "v.json")],
                                               capsys)
    assert "--vocab_size 4000000 is out of range: it must be > 0 and <= 2097152" in cli_error(
        main, [corpus_dir, "--vocab_size", "4000000", "--output", str(tmp_path / "w.json")], capsys)
    assert "--seed -1 is out of range" in cli_error(
        main, [corpus_dir, "--vocab_size", "300", "--seed", "-1", "--output", str(tmp_path / "w.json")], capsys)
    # never written over or into what it reads, with or without --overwrite
    before = {p: p.read_bytes() for p in corpus[0].iterdir()}
    first = sorted(corpus[0].iterdir())[0]
    for given, output, relation in ((corpus_dir, first, "lies inside"), (str(first), first, "is"),
                                    (corpus_dir, corpus[0] / "tok.json", "lies inside")):
        line = cli_error(main, [given, "--vocab_size", "300", "--output", str(output), "--overwrite"], capsys)
        assert line.startswith(f"error: --output {output} {relation} ") and "one of its inputs (INPUT)" in line, line
    assert {p: p.read_bytes() for p in corpus[0].iterdir()} == before
    # prepare refuses a file that is not a tokenizer in one line, before reading anything
    from lm_pretrain.commands.prepare import main as prepare_main

    assert "is not a tokenizer file of this project" in cli_error(
        prepare_main, [corpus_dir, "--tokenizer", str(tmp_path / "t.json"), "--output", str(tmp_path / "d")], capsys)


def test_mixing_datasets_of_two_tokenizers_is_refused(own, prepared, tmp_path):
    from lm_pretrain.data.datamodule import TokenDataModule
    from lm_pretrain.utils.errors import UserError

    dm = TokenDataModule(mixture=[{"data_dir": str(prepared), "weight": 1}, {"data_dir": str(own["data"]), "weight": 1}], batch_size=2,
                         block_size=8)
    with pytest.raises(UserError, match="tokenizer"):
        dm.setup("fit")


@pytest.mark.slow
def test_an_own_tokenizer_runs_through_every_command(own, corpus, prepared, tmp_path, capsys):
    data, runs = own["data"], tmp_path / "runs"
    args = [*train_args(data, max_steps=4, val_every=4), "--model.vocab_size", str(VOCAB),
            "--checkpoint.every_n_train_steps", "2", "--trainer.logger.init_args.save_dir", str(runs),
            "--trainer.callbacks.init_args.every_n_steps", "4", "--trainer.callbacks.init_args.max_new_tokens", "8"]
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "=== samples after 4 steps ===" in first.stdout
    (ckpt,) = runs.rglob("last.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    assert saved["hyper_parameters"]["tokenizer"] is None  # as given: empty, the data's
    assert saved["tokenizer"]["tokenizer"] == "tok" and saved["tokenizer"]["tokenizer_file"] == own["raw"]

    # resumed on the same data: fine; on data of another tokenizer: one line
    resumed = run_cli([*args[:args.index("--trainer.max_steps") + 1], "6", *args[args.index("--trainer.max_steps") + 2:],
                       "--ckpt_path", "last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(ckpt, weights_only=False)["global_step"] == 6
    other = [*train_args(prepared, max_steps=8, val_every=4), "--model.vocab_size", str(VOCAB), "--ckpt_path", str(ckpt),
             "--trainer.logger.init_args.save_dir", str(tmp_path / "runs2")]
    from lm_pretrain.commands.train import main as train_main

    line = cli_error(train_main, other[1:], capsys)  # a resume continues its own data: init_from starts anew
    assert f"was trained on {own['data']}, not {prepared}" in line and "--model.init_from" in line, line
    # another tokenizer of the same name (and size): told apart by its sha256
    other_tok, other_data = tmp_path / "tok.json", tmp_path / "other-data"
    train_tokenizer(str(other_tok), VOCAB - 20, inputs=[str(corpus[0])], val_fraction=0.2)
    prepare(find_inputs([str(corpus[0])]), other_data, val_fraction=0.2, tokenizer=str(other_tok), workers=2)
    line = cli_error(train_main, [*train_args(other_data, max_steps=2)[1:], "--model.vocab_size", str(VOCAB),
                                  "--model.init_from", str(ckpt), "--trainer.logger.init_args.save_dir",
                                  str(tmp_path / "runs2")], capsys)
    assert "was trained with tokenizer 'tok' (sha256 " in line and \
        f"but the data was prepared with 'tok' (sha256 {bpe.digest(json.loads(other_tok.read_text()))[:12]})" in line, line
    line = cli_error(train_main, [*train_args(prepared, max_steps=2)[1:], "--model.init_from", str(ckpt),
                                  "--trainer.logger.init_args.save_dir", str(tmp_path / "runs3")], capsys)
    assert "was trained with tokenizer 'tok'" in line and "'gpt2'" in line, line

    # generate decodes with the checkpoint's copy
    from lm_pretrain.commands.generate import main as generate_main

    generate_main(["--ckpt_path", str(ckpt), "--prompt", "alpha beta", "--max_new_tokens", "6", "--seed", "0"])
    assert capsys.readouterr().out.startswith("alpha beta")

    # export: transformers loads model and tokenizer, encodes as ours and gives our logits
    transformers = pytest.importorskip("transformers")
    from lm_pretrain.commands.export import export
    from lm_pretrain.training.module import LanguageModel

    export(str(ckpt), str(tmp_path / "hf"))
    ours = LanguageModel.from_checkpoint(ckpt)
    enc = ours.encoding
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = ["alpha beta gamma", "def f(x):\n    return x ** 2  # 12345", "中文，你好！", "emoji 😀🎉👍🏽",
             "  \n\n\t  runs   of\r\n whitespace", f"one{bpe.EOT_TEXT}two", "' 's 'll 'VE 123456789"]
    for text in texts:
        assert hf_tok(text, split_special_tokens=True)["input_ids"] == enc.encode_ordinary(text), text
        assert hf_tok(text)["input_ids"] == enc.encode(text, allowed_special="all"), text
        assert hf_tok.decode(enc.encode_ordinary(text)) == text
    assert hf_tok.eos_token_id == enc.eot_token == VOCAB - 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([enc.encode_ordinary("alpha beta gamma delta")])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4

    # evaluate: the harness scores with the checkpoint's tokenizer
    pytest.importorskip("lm_eval")
    from lm_pretrain.commands.evaluate import evaluate

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    source = ROOT / "tests" / "eval_task"
    (tasks / "tiny_mc.yaml").write_text((source / "tiny_mc.yaml").read_text().replace("DATA_FILE", str(source / "tiny_mc.jsonl")))
    results = evaluate(str(ckpt), "tiny_mc", include_path=str(tasks), output=str(tmp_path / "eval.json"))
    assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert not (own["folder"] / "tok.json").exists()  # all of it without the tokenizer file


def test_a_tokenizer_name_that_is_neither_tiktokens_nor_a_file_is_one_line():
    from lm_pretrain.utils.errors import UserError

    with pytest.raises(UserError, match="or give a tokenizer file"):
        get_tokenizer("no_such_encoding")


def test_model_tokenizer_must_be_the_datas(own):
    from lm_pretrain.utils.errors import UserError
    from lm_pretrain.training.module import LanguageModel

    meta = json.loads((own["data"] / "metadata.json").read_text())
    module = LanguageModel(tokenizer="gpt2", block_size=8, n_layer=1, n_head=1, n_embd=8, vocab_size=VOCAB)
    with pytest.raises(UserError, match=r"tokenized with 'tok' \(sha256 [0-9a-f]{12}\) but the model's tokenizer is 'gpt2'"):
        module.adopt_tokenizer(meta, str(own["data"]))
    module = LanguageModel(block_size=8, n_layer=1, n_head=1, n_embd=8, vocab_size=VOCAB)  # empty: the data's
    module.adopt_tokenizer(meta, str(own["data"]))
    assert module.encoding.n_vocab == VOCAB and module.tokenizer_record["tokenizer"] == "tok"
    assert module.encoding.decode(module.encoding.encode_ordinary("alpha 😀")) == "alpha 😀"


def test_a_model_loaded_with_one_tokenizer_refuses_data_of_another(own, prepared):
    """Weights are ids of their tokenizer: a module read from a checkpoint (from_checkpoint, or
    Lightning's load_from_checkpoint without our data module) keeps the checkpoint's, and data of
    another one is refused, also when that one's name is a tiktoken name."""
    from lm_pretrain.utils.errors import UserError
    from lm_pretrain.training.module import LanguageModel
    from lm_pretrain.data.prepared import load_metadata

    meta = json.loads((own["data"] / "metadata.json").read_text())
    module = LanguageModel(block_size=8, n_layer=1, n_head=1, n_embd=8, vocab_size=50257)
    module.on_load_checkpoint({"hyper_parameters": dict(module.hparams), "tokenizer": {
        k: meta[k] for k in ("tokenizer", "tokenizer_sha256", "tokenizer_file")}})
    assert module.encoding.n_vocab == VOCAB  # the checkpoint's, with nothing adopted
    with pytest.raises(UserError, match=r"tokenized with 'gpt2' but the model's tokenizer is 'tok' \(sha256"):
        module.adopt_tokenizer(load_metadata(prepared), str(prepared))
    impostor = {**meta, "tokenizer": "gpt2"}  # an own tokenizer that calls itself gpt2
    with pytest.raises(UserError, match="tokenized with 'gpt2' \\(sha256"):
        LanguageModel(tokenizer="gpt2", block_size=8, n_layer=1, n_head=1, n_embd=8).adopt_tokenizer(impostor, "x")


def test_a_tokenizer_may_not_take_a_tiktoken_name(corpus, tmp_path, capsys):
    line = cli_error(main, [str(corpus[0]), "--vocab_size", "300", "--output", str(tmp_path / "gpt2.json")], capsys)
    assert "'gpt2' is a tiktoken encoding's" in line and not (tmp_path / "gpt2.json").exists()


def test_ctrl_c_while_training_a_tokenizer_writes_nothing(corpus, tmp_path, monkeypatch, capsys):
    from helpers import interrupted_at
    from lm_pretrain.tokenizer import bpe as bpe_module

    args = [str(corpus[0]), "--vocab_size", "300", "--output", str(tmp_path / "tok.json")]
    interrupted_at(monkeypatch, bpe_module, "train", main, args, capsys)
    (tmp_path / "tok.json").write_text("an earlier tokenizer")
    interrupted_at(monkeypatch, bpe_module, "write", main, [*args, "--overwrite"], capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"] and (tmp_path / "tok.json").read_text() == \
        "an earlier tokenizer"
