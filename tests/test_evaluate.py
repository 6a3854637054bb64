"""Evaluation with EleutherAI's lm-evaluation-harness, offline: a tiny multiple-choice task of our
own (tests/eval_task) runs end to end through `lm-pretrain-evaluate`, and the adapter's log-likelihood
of every choice is the model's own sum of token log-probabilities."""

import json
import math
import re

import pytest
import torch

from helpers import ROOT, cli_error, tiny_checkpoint
from lm_pretrain.training.module import LanguageModel

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    """tests/eval_task with the data file's absolute path filled in."""
    folder = tmp_path_factory.mktemp("tasks")
    source = ROOT / "tests" / "eval_task"
    (folder / "tiny_mc.yaml").write_text((source / "tiny_mc.yaml").read_text().replace(
        "DATA_FILE", str(source / "tiny_mc.jsonl")))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt")[1]


def own_loglikelihood(module, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) straight from the model, one sequence at a time."""
    from lm_pretrain.tokenizer.encoding import get_tokenizer

    enc = get_tokenizer()
    context_ids, whole = enc.encode_ordinary(context), enc.encode_ordinary(context + continuation)
    with torch.no_grad():
        logits = module(torch.tensor([whole[:-1]]))[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


@pytest.mark.slow
def test_a_task_runs_end_to_end_and_scores_with_the_models_own_logprobs(checkpoint, task_folder, monkeypatch, capsys):
    from lm_pretrain.commands.evaluate import evaluate, harness_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = evaluate(str(checkpoint), "tiny_mc", include_path=str(task_folder), batch_size=3)
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "acc" in printed  # the harness's table
    written = json.loads(checkpoint.with_name("model-eval.json").read_text())
    accuracy = written["results"]["tiny_mc"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0 and written["results"] == json.loads(json.dumps(results["results"], default=str))

    # every choice of every question, through the adapter in batches, against the model itself
    from lm_eval.api.instance import Instance

    module = LanguageModel.from_checkpoint(checkpoint)
    lm = harness_model(module, batch_size=4)
    docs = [json.loads(line) for line in (ROOT / "tests" / "eval_task" / "tiny_mc.jsonl").read_text().splitlines()]
    pairs = [(doc["question"], " " + choice) for doc in docs for choice in doc["choices"]]
    scored = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (logprob, _) in zip(pairs, scored, strict=True):
        assert logprob == pytest.approx(own_loglikelihood(module, context, continuation), abs=1e-4)
    # the accuracy the harness reported is the argmax of those log-likelihoods
    best, i = [], 0
    for doc in docs:
        n = len(doc["choices"])
        best.append(max(range(n), key=lambda c: scored[i + c][0]) == doc["answer"])
        i += n
    assert accuracy == pytest.approx(sum(best) / len(best))


def test_rolling_loglikelihood_scores_every_token_once(checkpoint):
    """A text longer than the context is scored in the harness's rolling windows of block_size
    tokens: the adapter's total is the model's own log-probability of every token, each predicted
    once, from the tokens before it in its window."""
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from lm_pretrain.commands.evaluate import harness_model
    from lm_pretrain.tokenizer.encoding import get_tokenizer

    module = LanguageModel.from_checkpoint(checkpoint)
    text = " ".join(["The king loves the crown and the sea."] * 12)  # ~100 tokens, block_size 32
    (total,) = harness_model(module).loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    enc = get_tokenizer()
    tokens = enc.encode_ordinary(text)
    expected, predicted = 0.0, []
    with torch.no_grad():
        for context, target in map(make_disjoint_window, get_rolling_token_windows(tokens, enc.eot_token, 32, 1)):
            sequence = context + target
            logprobs = torch.log_softmax(module(torch.tensor([sequence[:-1]]))[0].double(), -1)
            expected += sum(logprobs[len(context) - 1 + k, t].item() for k, t in enumerate(target))
            predicted += target
    assert predicted == tokens  # every token once
    assert total == pytest.approx(expected, abs=1e-3) and total < 0 and math.isfinite(total)


def test_evaluate_errors_are_one_line(checkpoint, task_folder, tmp_path, capsys, monkeypatch):
    from lm_pretrain.commands.evaluate import main

    assert "unknown task(s) no_such_task" in cli_error(main, ["--ckpt_path", str(checkpoint), "--tasks", "no_such_task",
                                                              "--include_path", str(task_folder)], capsys)
    assert "does not exist" in cli_error(main, ["--ckpt_path", str(tmp_path / "none.ckpt"), "--tasks", "tiny_mc",
                                                "--include_path", str(task_folder)], capsys)
    assert "--batch_size 0 is out of range" in cli_error(main, ["--ckpt_path", str(checkpoint), "--tasks", "x",
                                                                "--batch_size", "0"], capsys)
    saved = checkpoint.read_bytes()
    line = cli_error(main, ["--ckpt_path", str(checkpoint), "--tasks", "tiny_mc", "--include_path", str(task_folder),
                            "--output", str(checkpoint)], capsys)
    assert line.startswith(f"error: --output {checkpoint} is {checkpoint}, one of its inputs (--ckpt_path)"), line
    line = cli_error(main, ["--ckpt_path", str(checkpoint), "--tasks", "tiny_mc", "--include_path", str(task_folder),
                            "--output", str(task_folder / "results.json")], capsys)
    assert "lies inside" in line and "(--include_path)" in line, line
    assert checkpoint.read_bytes() == saved and not (task_folder / "results.json").exists()
    import lm_eval

    from helpers import interrupted_at

    interrupted_at(monkeypatch, lm_eval, "simple_evaluate", main, ["--ckpt_path", str(checkpoint), "--tasks", "tiny_mc",
                   "--include_path", str(task_folder), "--output", str(tmp_path / "results.json")], capsys)
    assert not (tmp_path / "results.json").exists()  # Ctrl-C while scoring: no results file
    for device, says in (("cuda:3", "--device cuda:3: this machine has no such device; it has cpu"),
                         ("gpu0", "--device 'gpu0' is not a device name; this machine has cpu")):
        assert cli_error(main, ["--ckpt_path", str(checkpoint), "--tasks", "tiny_mc", "--device", device], capsys) == \
            f"error: {says}"


def test_generation_is_the_models_greedy_continuation_cut_at_a_stop_string(checkpoint):
    from lm_eval.api.instance import Instance

    from lm_pretrain.commands.evaluate import harness_model
    from lm_pretrain.tokenizer.encoding import get_tokenizer

    module, enc = LanguageModel.from_checkpoint(checkpoint), get_tokenizer()
    prompt = enc.encode_ordinary("The king")
    greedy = module.model.generate(torch.tensor([prompt]), 12, temperature=0)[0, len(prompt):].tolist()
    full = enc.decode(greedy)
    stop = full[len(full) // 2:][:3]  # a stop string from the middle of the greedy text
    (untouched,) = harness_model(module).generate_until([Instance("generate_until", {}, (
        "The king", {"until": ["\x00never"], "max_gen_toks": 12}), 0)])
    (cut,) = harness_model(module).generate_until([Instance("generate_until", {}, (
        "The king", {"until": [stop], "max_gen_toks": 12}), 0)])
    assert untouched == full and cut == full.split(stop)[0]


def test_a_full_disk_is_one_line_and_keeps_the_earlier_results(checkpoint, task_folder, small_disk, monkeypatch, capsys):
    """The results are scored, then cannot be written: one line naming the file and its size, the
    earlier results file whole, no partial file left on the disk."""
    from lm_pretrain.commands.evaluate import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = small_disk / "results.json"
    results.write_text('{"earlier": true}\n')
    with open(small_disk / "filler", "wb", buffering=0) as f:  # fill what is left of the 1 MiB disk
        with pytest.raises(OSError, match="No space left"):
            for _ in range(2**20 // 4096 + 1):
                f.write(b"x" * 4096)
    line = cli_error(main, ["--ckpt_path", str(checkpoint), "--tasks", "tiny_mc", "--include_path", str(task_folder),
                            "--output", str(results)], capsys)
    assert re.fullmatch(rf"error: no space left to write {re.escape(str(results))}: it needs ~\d+ KiB, 0 KiB are "
                        r"free there; the previous results.json is kept", line), line
    assert json.loads(results.read_text()) == {"earlier": True}
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "results.json"]
