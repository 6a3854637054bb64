"""End to end: train.py fit on a small corpus, then validate and generate from its checkpoint."""

import math
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import cli_error, ROOT, run_cli, scalars, TINY_MODEL, train_args
from lm_pretrain.data.prepared import load_metadata


@pytest.mark.slow
def test_fit_learns_and_logs(trained_run):
    logged = scalars(trained_run["log_dir"])
    for tag in ("train/loss", "train/ppl", "val/loss", "val/ppl", "val/bpb", "lr-AdamW/decay", "train/grad_norm",
                "perf/tokens_per_s", "perf/tflops_per_device", "model/flops_per_token"):
        assert logged.get(tag), f"{tag} not logged; have {sorted(logged)}"
    assert "perf/mfu" not in logged  # no known peak on a CPU
    assert all(0 < v < 1e9 for _, v in logged["perf/tokens_per_s"])
    flops = logged["model/flops_per_token"][0][1]
    for (_, tps), (_, tflops) in zip(logged["perf/tokens_per_s"], logged["perf/tflops_per_device"]):
        assert tflops == pytest.approx(tps * flops / 1e12, rel=1e-4)  # one device here
    assert all(0 < v < 100 for _, v in logged["train/grad_norm"])
    val = [v for _, v in logged["val/loss"]]
    first_train_loss = logged["train/loss"][0][1]
    assert len(val) == 3  # validated at steps 20, 40, 60
    assert first_train_loss > 9.0  # starts near ln(50257) = 10.8 ...
    assert val[-1] < 4.0 and val[-1] < val[0] - 0.3, val  # ... and learns: val loss keeps falling
    for (_, loss), (_, ppl) in zip(logged["val/loss"], logged["val/ppl"]):
        assert ppl == pytest.approx(torch.exp(torch.tensor(loss)).item(), rel=1e-3)
    val_split = load_metadata(trained_run["data"])["splits"]["val"]
    for (_, loss), (_, bpb) in zip(logged["val/loss"], logged["val/bpb"], strict=True):  # bits per UTF-8 byte
        assert bpb == pytest.approx(loss / math.log(2) * val_split["tokens"] / val_split["bytes"], rel=1e-4)
    lrs = [v for _, v in logged["lr-AdamW/decay"]]
    assert max(lrs) == pytest.approx(0.01, rel=0.05) and lrs[-1] < lrs[len(lrs) // 2]  # warmup then decay
    assert "=== samples after 60 steps ===" in trained_run["stdout"]
    events = EventAccumulator(str(trained_run["log_dir"]), size_guidance={"tensors": 0})
    events.Reload()
    for tag in ("samples/0/text_summary", "samples/1/text_summary"):  # the fixed prompts, every 20 steps
        texts = [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
        assert [step for step, _ in texts] == [20, 40, 60]
        assert all(text.startswith(("ROMEO:", "To be, or not to be")) and len(text) > 30 for _, text in texts)


@pytest.mark.slow
def test_fit_writes_checkpoints(trained_run):
    ckpt_dir = trained_run["ckpt"].parent
    assert trained_run["ckpt"].is_file()
    assert len(list(ckpt_dir.glob("best-step*.ckpt"))) == 1
    state = torch.load(trained_run["ckpt"], map_location="cpu", weights_only=False)
    assert state["global_step"] == 60
    assert state["hyper_parameters"]["n_embd"] == 32 and state["hyper_parameters"]["tokenizer"] is None  # the data's
    assert state["tokenizer"] == {"tokenizer": "gpt2"}  # which the checkpoint names
    assert (trained_run["log_dir"] / "config.yaml").is_file()


def test_the_model_vocabulary_follows_the_data_unless_given(prepared, trained_run, tmp_path, capsys, monkeypatch):
    """model.vocab_size empty: the data's tokenizer's (its metadata, or a built-in corpus's known
    size without preparing it), the resumed checkpoint's with --ckpt_path; --print_config and the
    checkpoint show the number. A value given stays, and one too small is today's one-line error."""
    from lm_pretrain.commands.train import main, run

    monkeypatch.chdir(tmp_path)

    def printed_vocab(*args: str) -> int:
        with pytest.raises(SystemExit):
            run(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), *args, "--print_config"])
        return int(re.search(r"^  vocab_size: (\d+)$", capsys.readouterr().out, re.M).group(1))

    assert printed_vocab() == 2048  # data/shakespeare-bpe2k: the demo's own tokenizer
    assert printed_vocab("--data.data_dir", "data/shakespeare") == 50257  # GPT-2's
    assert printed_vocab("--data.data_dir", str(prepared)) == load_metadata(prepared)["vocab_size"] == 50257
    assert printed_vocab("--data.data_dir", str(prepared), "--model.vocab_size", "50304") == 50304
    assert printed_vocab("--data.data_dir", str(prepared), "--ckpt_path", str(trained_run["ckpt"])) == 50257
    assert list(tmp_path.iterdir()) == []  # nothing prepared, no run folder claimed

    state = torch.load(trained_run["ckpt"], map_location="cpu", weights_only=False)  # trained without the flag
    assert state["hyper_parameters"]["vocab_size"] == 50257
    assert "  vocab_size: 50257\n" in (trained_run["log_dir"] / "config.yaml").read_text()
    line = cli_error(main, [*train_args(prepared, max_steps=1)[1:], "--model.vocab_size", "2048"], capsys)
    assert line.endswith("but model.vocab_size is 2048; set model.vocab_size to at least 50257"), line


@pytest.mark.parametrize("given,rest,printing", [
    (["fit", "--print_config", "--x", "1"], ["fit", "--x", "1"], ["--print_config"]),
    (["fit", "--x", "1", "--print_config=skip_null"], ["fit", "--x", "1"], ["--print_config=skip_null"]),
    (["fit", "--print_config", "skip_null", "--x", "1"], ["fit", "--x", "1"], ["--print_config", "skip_null"]),
    (["fit", "--x", "1"], ["fit", "--x", "1"], []),
])
def test_print_config_is_set_aside_until_the_config_is_whole(given, rest, printing):
    from lm_pretrain.commands.train import split_print_config

    assert split_print_config(given) == (rest, printing)


@pytest.mark.slow
def test_validate_from_checkpoint(trained_run):
    done = run_cli([str(ROOT / "train.py"), "validate", "--config", str(ROOT / "configs" / "tiny.yaml"),
                    "--data.data_dir", str(trained_run["data"]), *TINY_MODEL, "--trainer.limit_val_batches", "4",
                    "--ckpt_path", str(trained_run["ckpt"]), "--trainer.logger", "false"], cwd=trained_run["workdir"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "val/loss" in done.stdout


@pytest.mark.slow
def test_generate_prints_text(trained_run, capsys):
    from lm_pretrain.commands.generate import main

    args = ["--ckpt_path", str(trained_run["ckpt"]), "--prompt", "The king", "--max_new_tokens", "20", "--seed", "1"]
    main(args)
    first = capsys.readouterr().out
    assert first.startswith("The king") and len(first.split()) > 5
    main(args)
    assert capsys.readouterr().out == first  # seeded: reproducible


def test_clear_errors(tmp_path, prepared, capsys, monkeypatch):
    from lm_pretrain.commands.train import main as train
    from lm_pretrain.commands.generate import main as generate

    monkeypatch.chdir(tmp_path)
    args = train_args(prepared, max_steps=2)[1:]  # without train.py: main takes the arguments after it
    nope = train_args(tmp_path / "nope", max_steps=2)[1:]
    assert "does not exist" in cli_error(train, nope, capsys)
    assert not (tmp_path / "nope").exists() and not (tmp_path / "data").exists()  # no silent download

    bad_ckpt = tmp_path / "bad.ckpt"
    bad_ckpt.write_text("not a checkpoint")
    for ckpt in (bad_ckpt, tmp_path / "absent.ckpt"):
        assert str(ckpt) in cli_error(generate, ["--ckpt_path", str(ckpt)], capsys)
    assert cli_error(generate, ["--ckpt_path", str(bad_ckpt), "--device", "cuda"], capsys) == \
        "error: --device cuda: this machine has no such device; it has cpu"  # before the checkpoint is read

    # the model has no test_step or predict_step: those subcommands are not there to fail later
    line = cli_error(train, ["test", "--config", str(ROOT / "configs" / "tiny.yaml")], capsys)
    assert "invalid choice: 'test' (choose from 'fit', 'validate')" in line and line.endswith("(see python train.py --help)")
    assert "n_layers" in cli_error(train, [*args, "--model.n_layers", "3"], capsys)
    assert "model.n_layer" in cli_error(train, [*args, "--model.n_layer", "two"], capsys)
    assert "divisible by n_head" in cli_error(train, [*args, "--model.n_head", "3"], capsys)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    assert "Problems parsing config" in cli_error(train, ["fit", "--config", str(bad_yaml)], capsys)
    assert "absent.yaml" in cli_error(train, ["fit", "--config", str(tmp_path / "absent.yaml")], capsys)
    assert "absent.ckpt does not exist" in cli_error(train, [*args, "--ckpt_path", str(tmp_path / "absent.ckpt")],
                                                      capsys)
    (tmp_path / "a-file").write_text("x")
    for flag in ("--trainer.default_root_dir", "--trainer.logger.init_args.save_dir", "--checkpoint.dirpath"):
        assert f"{flag} a-file/runs: cannot be created, a-file is a file" in cli_error(
            train, [*args, flag, "a-file/runs"], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "bad.ckpt", "bad.yaml"]  # refused before any work


def test_help_documents_the_flags(capsys):
    from lm_pretrain.commands.train import main

    with pytest.raises(SystemExit) as done:
        main(["fit", "--help"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    for flag in ("--model.n_layer", "--model.learning_rate", "--data.data_dir", "--trainer.max_steps",
                 "--checkpoint.every_n_train_steps", "--ckpt_path"):
        assert flag in printed
    assert "width of the residual stream" in printed  # GPTConfig's docstring becomes the help text


PRESETS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
OVERLAYS = sorted(p.name for p in (ROOT / "configs" / "overlays").glob("*.yaml"))


@pytest.mark.parametrize("config", [f"configs/{p}" for p in PRESETS] + [f"configs/overlays/{o}" for o in OVERLAYS])
def test_every_config_parses(config, capsys):
    """Presets alone, overlays on top of the tiny preset."""
    from lm_pretrain.commands.train import run

    configs = ["--config", str(ROOT / config)] if "overlays" not in config else \
        ["--config", str(ROOT / "configs" / "tiny.yaml"), "--config", str(ROOT / config)]
    with pytest.raises(SystemExit) as done:  # --print_config prints the resolved config and exits
        run(["fit", *configs, "--print_config"])
    assert done.value.code in (0, None)
    assert re.search(r"^    class_path: (lightning.pytorch|lm_pretrain.training).loggers.\w+Logger$", capsys.readouterr().out, re.M)


def test_gpu_presets_need_a_data_folder(capsys):
    """The GPU presets name no corpus: a run without --data.data_dir stops at once instead of
    quietly training a 124M model on 1.5M tokens of Shakespeare."""
    from lm_pretrain.commands.train import main

    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(ROOT / "configs" / "gpt2-124m.yaml"), "--trainer.accelerator", "cpu"])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: data.data_dir is not set")


@pytest.mark.slow
def test_tiny_llama_trains_then_continues_from_its_weights(prepared, tmp_path, capsys, monkeypatch):
    llama = ["--model.n_kv_head", "1", "--model.mlp_hidden", "64"]
    first = run_cli([*train_args(prepared, max_steps=40, config="tiny-llama"), *llama], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    from lm_pretrain.model import GPTConfig, model_size

    size = model_size(GPTConfig(block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, mlp_hidden=64, bias=False,
                                position="rope", norm="rmsnorm", mlp="swiglu"))
    assert f"model: {size['params'] / 1e6:.2f}M parameters" in first.stdout  # logged at start
    run = tmp_path / "runs" / "tiny-llama" / "version_0"
    val = [v for _, v in scalars(run)["val/loss"]]
    assert val[-1] < val[0] and val[-1] < 4.5, val
    assert scalars(run)["model/flops_per_token"][0][1] > 0

    # continued pre-training: the weights carry over, the optimizer and schedule start afresh
    ckpt = run / "checkpoints" / "last.ckpt"
    more = run_cli([*train_args(prepared, max_steps=10, val_every=10, config="tiny-llama"), *llama,
                    "--model.init_from", str(ckpt)], cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    second = scalars(tmp_path / "runs" / "tiny-llama" / "version_1")
    assert second["train/loss"][0][1] < 5.0  # a fresh model would start near 10.8
    assert second["lr-AdamW/decay"][0][1] < 0.01  # warming up again
    assert torch.load(tmp_path / "runs" / "tiny-llama" / "version_1" / "checkpoints" / "last.ckpt",
                      weights_only=False)["global_step"] == 10

    from lm_pretrain.commands.train import main

    monkeypatch.chdir(tmp_path)
    line = cli_error(main, [*train_args(prepared, max_steps=2, config="tiny-llama")[1:], "--model.init_from", str(ckpt)],
                     capsys)
    assert "another architecture" in line and "n_kv_head=1 (config: 2)" in line


def test_a_run_never_writes_into_what_it_reads(tmp_path, prepared, capsys, monkeypatch):
    from lm_pretrain.commands.train import main as train

    monkeypatch.chdir(tmp_path)
    args = train_args(prepared, max_steps=2)[1:]
    before = {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    for dirpath, relation in ((prepared, "is"), (prepared / "ckpts", "lies inside")):  # (a folder above: no file
        # of the data can be written over, checkpoints go to its top level)
        line = cli_error(train, [*args, "--checkpoint.dirpath", str(dirpath)], capsys)
        assert line.startswith(f"error: --checkpoint.dirpath {dirpath} {relation} {prepared}") and \
            "one of its inputs (--data.data_dir)" in line, line
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "last.ckpt").write_bytes(b"the weights a new run starts from")
    line = cli_error(train, [*args, "--model.init_from", "old/last.ckpt", "--checkpoint.dirpath", "old"], capsys)
    assert line.startswith("error: --checkpoint.dirpath old contains old/last.ckpt") and "(--model.init_from)" in line
    assert (tmp_path / "old" / "last.ckpt").read_bytes() == b"the weights a new run starts from"
    assert {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # refused before any work: no run folder


def test_a_train_split_smaller_than_one_batch_is_an_error_not_a_run_of_no_steps(tmp_path, capsys, monkeypatch):
    from lm_pretrain.commands.train import main as train
    from lm_pretrain.data.prepare import prepare
    from lm_pretrain.data.readers import find_inputs

    for i in range(6):  # ~60 tokens each: train ~240 tokens, 7 windows of 33 -- fewer than a batch of 8
        (tmp_path / f"{i}.txt").write_text(" ".join(["the king loves the crown, and the queen the sea."] * 5))
    data = tmp_path / "small"
    prepare(find_inputs([str(tmp_path / f"{i}.txt") for i in range(6)]), data, val_fraction=0.34, workers=1)
    monkeypatch.chdir(tmp_path)
    line = cli_error(train, train_args(data, max_steps=2)[1:], capsys)
    assert re.fullmatch(rf"error: {data}/train holds \d windows of block_size \+ 1 = 33 tokens, fewer than one batch of "
                        r"data.batch_size 8 for each of 1 process\(es\): no training step could be taken; use more "
                        r"text, or a smaller data.batch_size or block_size", line), line
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


@pytest.mark.slow
def test_runs_started_at_once_each_get_their_own_run_folder(prepared, tmp_path):
    import concurrent.futures

    args = [*train_args(prepared, max_steps=2, val_every=2), "--trainer.limit_val_batches", "2"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda _: run_cli(args, cwd=tmp_path), range(3)))
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr[-2000:] for r in runs]
    folders = sorted((tmp_path / "runs" / "tiny").iterdir())
    assert [f.name for f in folders] == ["version_0", "version_1", "version_2"]
    for folder in folders:  # each its own checkpoint and config: none replaced another's
        assert (folder / "checkpoints" / "last.ckpt").is_file() and (folder / "config.yaml").is_file()
        assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    # a run started again from a saved config.yaml claims a folder of its own (its version is not pinned)
    again = run_cli([str(ROOT / "train.py"), "fit", "--config", str(folders[0] / "config.yaml")], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(f.name for f in (tmp_path / "runs" / "tiny").iterdir())[-1] == "version_3"


@pytest.mark.slow
def test_resuming_on_other_data_says_to_use_init_from(trained_run, tmp_path, capsys, monkeypatch):
    """litdata would stop deep in the restore ("input_dir path state doesn't match"); validate may
    still score the checkpoint on any data."""
    import shutil

    from lm_pretrain.commands.train import main as train

    other = tmp_path / "other"
    shutil.copytree(trained_run["data"], other)
    monkeypatch.chdir(tmp_path)
    ckpt = str(trained_run["ckpt"])
    line = cli_error(train, [*train_args(other, max_steps=70)[1:], "--ckpt_path", ckpt], capsys)
    assert line == (f"error: checkpoint {ckpt} was trained on {trained_run['data']}, not {other}: --ckpt_path continues "
                    f"a run where it stopped in its own data; to train its weights on other data, start a new run "
                    f"with --model.init_from {ckpt} instead")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
    scored = run_cli([str(ROOT / "train.py"), "validate", *train_args(other)[2:], "--ckpt_path", ckpt], cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-2000:]
    # the same data by another path (relative, from another folder, through a link): the run continues
    (tmp_path / "link").symlink_to(trained_run["data"])
    same = run_cli([*train_args("link", max_steps=60), "--ckpt_path", ckpt], cwd=tmp_path)  # its step: ends at once
    assert same.returncode == 0, same.stderr[-2000:]


def test_omp_num_threads_sets_the_thread_count_of_a_process_already_started(monkeypatch):
    """A process forked from a running interpreter (the tests' warm processes, a notebook) keeps its
    thread count unless told: rounding, and so bitwise comparisons, depend on it."""
    from lm_pretrain.commands.train import use_omp_num_threads

    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
            use_omp_num_threads()
            assert torch.get_num_threads() == threads
        monkeypatch.delenv("OMP_NUM_THREADS")
        use_omp_num_threads()  # unset: left to Lightning
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
