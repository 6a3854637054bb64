"""Sharded training (FSDP2, configs/overlays/fsdp.yaml) and DDP on 2 CPU processes against one process.

The GPU path is the same code with nccl instead of gloo: what is proven here holds there.
"""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import assert_same_run, attach, callback, env, python, ROOT, run_args, run_cli
from lm_pretrain.training.debug import read_records

pytestmark = pytest.mark.slow  # multi-process and end-to-end runs

CLIP = 0.3  # tests/sharded_equivalence.py


def equivalence_run(kind: str, devices: int, batch: int, data: Path, folder: Path) -> tuple[list, list]:
    """(per-step records, end-of-training records) of tests/sharded_equivalence.py, all ranks."""
    record = folder / kind
    done = subprocess.run([python(), str(ROOT / "tests" / "sharded_equivalence.py"), kind, str(devices),
                           str(batch), str(data), str(record)], cwd=folder, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for f in sorted(folder.glob(f"{kind}.rank*")) for line in f.read_text().splitlines()]
    return [r for r in rows if "step" in r], [r for r in rows if "groups" in r]


@pytest.fixture(scope="module")
def one_process(prepared, tmp_path_factory):
    return equivalence_run("single", 1, 8, prepared, tmp_path_factory.mktemp("single"))


@pytest.mark.slow
@pytest.mark.parametrize("kind, processes", [("fsdp", 2), ("ddp", 2), ("tp", 2), ("tp", 4)],
                         ids=["fsdp", "ddp", "tensor parallel 2", "fsdp 2 x tensor parallel 2"])
def test_n_processes_match_one_with_the_global_batch(kind, processes, one_process, prepared, tmp_path):
    """DDP, FSDP2, tensor parallelism in one group of 2, and 2 FSDP groups of 2 tensor-parallel
    processes (4 processes) against one process: the same samples, losses, gradient norms, validation
    and text samples. The processes of a tensor-parallel group read the same samples."""
    from lm_pretrain.data.datamodule import TokenDataModule

    steps, (end,) = one_process
    group = 2 if kind == "tp" else 1
    replicas = processes // group
    sharded_steps, sharded_end = equivalence_run(kind, processes, 8 // replicas, prepared, tmp_path)
    assert len(steps) == 10 and len(sharded_steps) == 10 * processes and len(sharded_end) == processes
    for one in steps:
        ranks = [r for r in sharded_steps if r["step"] == one["step"]]
        for first in range(0, processes, group):  # a group's processes: the same samples and loss
            assert all(r["rows"] == ranks[first]["rows"] and r["loss"] == ranks[first]["loss"]
                       for r in ranks[first:first + group])
        replica_rows = [r["rows"] for r in ranks[::group]]
        assert sorted(sum(replica_rows, [])) == sorted(one["rows"])  # the same samples
        assert abs(sum(r["loss"] for r in ranks) / processes - one["loss"]) <= 1e-5
        for rank in ranks:  # the whole model's gradient norm, before and after clipping
            assert one["grad_norm"] > CLIP and rank["clipped_norm"] == pytest.approx(CLIP, abs=1e-5)
            # from the same weights, the same gradient; later, Adam's updates of near-zero gradients
            # amplify the rounding differences of a sharded reduction (up to ~8e-5 by step 10)
            assert rank["grad_norm"] == pytest.approx(one["grad_norm"], abs=1e-5 if one["step"] == 1 else 1e-4)
    # an uneven validation split: the ranks' last batches are part padding, yet they run as many
    val = attach(TokenDataModule(str(prepared), batch_size=4), block_size=16)
    val.setup("fit")
    assert sum(val.val_dataset.sizes) % 8 != 0
    for rank in sharded_end:
        # FSDP: built on the meta device, each process keeping its shards: the same initial weights, bitwise
        assert rank["built_on_meta"] == (kind != "ddp") and not end["built_on_meta"]
        assert rank["initial"] == end["initial"] and len(end["initial"]) > 8
        assert rank["groups"] == end["groups"] and len(end["groups"]["decay"]) == 12  # same decay groups
        assert rank["val_batches"] == sharded_end[0]["val_batches"]
        assert rank["val_loss"] == pytest.approx(end["val_loss"], abs=1e-5)
        assert rank["samples"] == end["samples"] and len(rank["samples"][0]) > len("The king")  # every rank samples


@pytest.fixture(scope="module")
def one_process_moe(prepared, tmp_path_factory):
    return equivalence_run("single-moe", 1, 8, prepared, tmp_path_factory.mktemp("single-moe"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp-moe", "ddp-moe"])
def test_a_mixture_of_experts_on_two_processes_matches_one_process(kind, one_process_moe, prepared, tmp_path):
    """Experts, router losses over all processes' choices and the balancing bias: FSDP2 or DDP on 2
    processes follows one process at the global batch, to the final bias."""
    (steps, (end,)), (sharded_steps, sharded_end) = one_process_moe, equivalence_run(kind, 2, 4, prepared, tmp_path)
    assert len(sharded_steps) == 20 and len(sharded_end) == 2
    for one in steps:
        ranks = [r for r in sharded_steps if r["step"] == one["step"]]
        assert sorted(sum((r["rows"] for r in ranks), [])) == sorted(one["rows"])
        assert abs(sum(r["loss"] for r in ranks) / 2 - one["loss"]) <= 1e-5
        assert all(r["grad_norm"] == pytest.approx(one["grad_norm"], abs=1e-5 if one["step"] == 1 else 1e-4)
                   for r in ranks)
    for rank in sharded_end:
        assert rank["initial"] == end["initial"] and any(k.endswith("mlp.gate") for k in end["initial"])
        assert rank["val_loss"] == pytest.approx(end["val_loss"], abs=1e-5)
        assert rank["bias"] == end["bias"] and any(any(b) for b in end["bias"])
        assert rank["samples"] == end["samples"]


def fsdp_run(data: Path, folder: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    folder.mkdir(exist_ok=True)
    return run_cli([*run_args(data, steps, folder / "rec", every=2), "--config", str(ROOT / "configs" / "overlays" / "fsdp.yaml"),
                    "--trainer.accelerator", "cpu", "--trainer.devices", "2", *extra], cwd=folder)


@pytest.mark.slow
def test_fsdp_resumes_exactly_and_its_checkpoint_serves_every_command(prepared, tmp_path):
    from lm_pretrain.training import checkpoints
    from lm_pretrain.model import GPTConfig
    from lm_pretrain.training.module import LanguageModel

    straight = fsdp_run(prepared, tmp_path / "a", 4, callback("SaveFullWeights", path=str(tmp_path / "full.pt")))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "=== samples after 4 steps ===" in straight.stdout
    ckpt = tmp_path / "a" / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard per process
    assert not list(ckpt.parent.glob(".*"))  # nothing left of the staging folders

    # killed after step 3 (last checkpoint: step 2), resumed: the same batches and losses
    assert fsdp_run(prepared, tmp_path / "b", 4, callback("SignalAt", step=3)).returncode != 0
    resumed = fsdp_run(prepared, tmp_path / "b", 4, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(read_records(tmp_path / "b" / "rec"), read_records(tmp_path / "a" / "rec"))

    # one process reads the shards back whole: the weights the run ended with
    full = {k.removeprefix("model."): v for k, v in torch.load(tmp_path / "full.pt").items()}
    read = checkpoints.read(ckpt)
    assert read["global_step"] == 4
    weights = checkpoints.model_weights(read)
    assert weights.keys() == full.keys() and all(torch.equal(weights[k], full[k]) for k in full)
    assert all(torch.equal(v, full[k]) for k, v in checkpoints.load_weights(str(ckpt), GPTConfig.from_dict(
        read["hyper_parameters"])).items())

    sample = run_cli(["-m", "lm_pretrain.commands.generate", "--ckpt_path", str(ckpt), "--prompt", "The king", "--max_new_tokens",
                      "5", "--seed", "0"], cwd=tmp_path)
    assert sample.returncode == 0 and sample.stdout.startswith("The king"), sample.stderr[-2000:]
    export = run_cli(["-m", "lm_pretrain.commands.export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "hf")], cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-2000:]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = LanguageModel.from_checkpoint(ckpt)
    tokens = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max() < 1e-4
    continued = run_cli([*run_args(prepared, 1, tmp_path / "rec-c"), "--model.init_from", str(ckpt)],
                        cwd=tmp_path)
    assert continued.returncode == 0, continued.stderr[-3000:]
    # sharded again: each process, built on the meta device, starts from its shards of those weights
    continued = fsdp_run(prepared, tmp_path / "c", 1, "--model.init_from", str(ckpt),
                         callback("SaveFullWeights", path=str(tmp_path / "start.pt"), at_start=True))
    assert continued.returncode == 0, continued.stderr[-3000:]
    start = {k.removeprefix("model."): v for k, v in torch.load(tmp_path / "start.pt").items()}
    assert start.keys() == full.keys() and all(torch.equal(start[k], full[k]) for k in full)


@pytest.mark.slow
def test_tensor_parallel_compiled_blocks_stay_compiled_through_samples_validation_and_checkpoints(prepared, tmp_path):
    """llama-125m as shipped (compile on) in one tensor-parallel group of 2 processes: each block's
    compiled forward takes the split matrices, and the training steps keep reusing their graphs."""
    done = run_cli(compiled_fsdp_args(prepared, tmp_path / "runs", 6, 1, 5, "--model.n_kv_head", "2",
                                      "--trainer.strategy.init_args.tensor_parallel_size", "2"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CompiledStepCheck: the 5 training steps after this process's first reused the graphs" in done.stderr


@pytest.mark.slow
def test_a_checkpoint_resumes_under_another_layout_and_a_tensor_parallel_one_serves_every_command(prepared, tmp_path):
    """FSDP over 2 processes to step 2, then from that checkpoint 2 FSDP groups of 2 tensor-parallel
    processes (4 processes, the same 2 data replicas): the batches and, to rounding (the layouts sum
    in other orders), the losses of a straight FSDP run. The 2-D checkpoint serves generate and
    export, whose model is the checkpoint's."""
    from lm_pretrain.training.module import LanguageModel

    no_dropout, tp = ("--model.dropout", "0"), "--trainer.strategy.init_args.tensor_parallel_size"
    straight = fsdp_run(prepared, tmp_path / "s", 4, *no_dropout)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = fsdp_run(prepared, tmp_path / "a", 2, *no_dropout)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = fsdp_run(prepared, tmp_path / "a", 4, *no_dropout, tp, "2", "--trainer.devices", "4", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
    want = {(r["rank"], r["step"]): r for r in read_records(tmp_path / "s" / "rec")}
    got = read_records(tmp_path / "a" / "rec")
    assert sorted((r["rank"], r["step"]) for r in got) == \
        sorted([(rank, step) for rank in (0, 1) for step in (1, 2)] + [(rank, step) for rank in range(4) for step in (3, 4)])
    for r in got:  # process r of the 2-D run is in group r // 2: FSDP process r // 2's replica
        replica = r["rank"] // 2 if r["step"] > 2 else r["rank"]
        assert r["rows"] == want[(replica, r["step"])]["rows"]
        assert r["loss"] == pytest.approx(want[(replica, r["step"])]["loss"], abs=1e-5)

    ckpt = tmp_path / "a" / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    sample = run_cli(["-m", "lm_pretrain.commands.generate", "--ckpt_path", str(ckpt), "--prompt", "The king",
                      "--max_new_tokens", "5", "--seed", "0"], cwd=tmp_path)
    assert sample.returncode == 0 and sample.stdout.startswith("The king"), sample.stderr[-2000:]
    export = run_cli(["-m", "lm_pretrain.commands.export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "hf")],
                     cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-2000:]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert (hf(tokens).logits - LanguageModel.from_checkpoint(ckpt)(tokens)).abs().max() < 1e-4


def compiled_fsdp_args(data: Path, runs: Path, steps: int, early: int, late: int, *extra: str) -> list[str]:
    """configs/llama-125m.yaml as shipped (compile on) with the FSDP overlay, shrunk to 2 CPU processes:
    samples every 3 steps, a validation every 2 steps, a checkpoint every 4, under CompiledStepCheck."""
    return [str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "llama-125m.yaml"),
            "--config", str(ROOT / "configs" / "overlays" / "fsdp.yaml"), "--data.data_dir", str(data),
            # 10 blocks: more than Dynamo's recompile limit (8), so one graph must serve them all
            "--data.batch_size", "2", "--model.block_size", "32", "--model.n_layer", "10", "--model.n_head", "2",
            "--model.n_kv_head", "1", "--model.n_embd", "32", "--model.mlp_hidden", "64",
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
            "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "5",
            "--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", "4",
            "--trainer.limit_val_batches", "3", "--checkpoint.every_n_train_steps", "4",
            "--trainer.callbacks.init_args.every_n_steps", "3", "--trainer.callbacks.init_args.max_new_tokens", "4",
            "--trainer.logger.init_args.save_dir", str(runs), "--trainer.enable_progress_bar", "false",
            callback("CompiledStepCheck", early=early, late=late), *extra]


def test_fsdp_compiled_blocks_stay_compiled_through_samples_validation_checkpoints_and_resume(prepared, tmp_path):
    # Under FSDP2 each block is compiled on its own (strategies.parallelize); CompiledStepCheck fails
    # the run if a training step recompiles or runs other operators in step 7 than in step 1.
    # with downstream evaluations at steps 3 and 6 too (the eager model, other shapes): training keeps its graphs
    downstream = "--trainer.callbacks+=" + json.dumps({
        "class_path": "lm_pretrain.training.downstream.DownstreamEval",
        "init_args": {"tasks": [str(ROOT / "tests" / "downstream" / "tiny_rc.jsonl")], "every_n_steps": 3, "limit": 6}})
    first = run_cli(compiled_fsdp_args(prepared, tmp_path / "runs", 9, 1, 7, downstream), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "CompiledStepCheck: the 8 training steps after this process's first reused the graphs" in first.stderr
    assert "=== downstream after 9 steps" in first.stdout
    resumed = run_cli(compiled_fsdp_args(prepared, tmp_path / "runs", 13, 10, 12, "--ckpt_path", "last"),
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
    assert re.search(r"CompiledStepCheck: the \d+ training steps after this process's first reused the graphs compiled "
                     r"in it; steps 10 and 12 ran the same", resumed.stderr)


@pytest.mark.slow
def test_a_compiled_sharded_mixture_of_experts_keeps_its_graphs(prepared, tmp_path):
    """Experts under FSDP2 with compiled, checkpointed blocks: the routing and its statistics compile
    into the blocks' graphs without a break or a recompile (the balancing runs eagerly after them)."""
    done = run_cli(compiled_fsdp_args(prepared, tmp_path / "runs", 9, 1, 7, "--model.mlp", "moe", "--model.n_experts",
                                      "4", "--model.mlp_hidden", "16", "--model.router_bias_rate", "0.001"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"CompiledStepCheck: the 8 training steps after this process's first reused the graphs .*"
                     r"no graph break", done.stderr)
