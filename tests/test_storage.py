"""Data in S3-compatible object storage, against a local moto S3 server on 127.0.0.1.

The server runs in a thread of the test process; training and prepare run in fresh processes that
reach it over TCP, with fake credentials from the environment, exactly as they would reach MinIO.
"""

import json
import logging
import socket

import pytest
import torch
from botocore.exceptions import EndpointConnectionError
from moto.server import ThreadedMotoServer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import attach, cli_error, run_cli, train_args
from lm_pretrain.data.datamodule import TokenDataModule
from lm_pretrain.utils.errors import UserError
from lm_pretrain.data.prepare import prepare, upload_dataset
from lm_pretrain.data.prepared import load_metadata
from lm_pretrain.data.readers import find_inputs
from lm_pretrain.data.storage import ObjectStore

BUCKET = "lm-data"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> dict:
    """A moto S3 server on a free local port with one empty bucket; fake credentials in the environment."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    nowhere = str(tmp_path_factory.mktemp("aws") / "absent")
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        for name, value in {**FAKE_CREDENTIALS, "AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_CONFIG_FILE": nowhere,
                            "AWS_EC2_METADATA_DISABLED": "true"}.items():  # never ask 169.254.169.254
            env.setenv(name, value)
        options = {"endpoint_url": endpoint}
        ObjectStore(f"s3://{BUCKET}", options).client.create_bucket(Bucket=BUCKET)
        yield {"endpoint": endpoint, "options": options}
    server.stop()


@pytest.fixture(scope="module")
def remote_data(s3, corpus, tmp_path_factory) -> str:
    """The test corpus prepared straight into the bucket by the command line."""
    url = f"s3://{BUCKET}/data"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", s3["endpoint"])  # the endpoint from the environment, not a flag
        done = run_cli(["-m", "lm_pretrain.commands.prepare", str(corpus[0]), "--output", url, "--workers", "1",
                        "--val_fraction", "0.2"], cwd=tmp_path_factory.mktemp("prepare"), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"uploaded to {url}" in done.stderr
    return url


def test_prepare_writes_the_same_dataset_to_the_bucket(s3, remote_data, prepared):
    names = ObjectStore(remote_data, s3["options"]).sizes()
    assert {"metadata.json", "train/index.json", "val/index.json"} <= set(names)
    remote, local = load_metadata(remote_data, s3["options"]), load_metadata(prepared)
    assert remote["splits"] == local["splits"] and remote["tokenizer"] == local["tokenizer"]
    assert {f"{split}/{shard['file']}": shard["bytes"] for split in ("train", "val")
            for shard in remote["shards"][split]} == {n: size for n, size in names.items() if n != "metadata.json"}


@pytest.mark.slow
def test_train_streams_from_the_bucket(s3, remote_data, tmp_path):
    cache = tmp_path / "cache"
    done = run_cli([*train_args(remote_data, max_steps=4, val_every=2),
                    "--data.storage_options", json.dumps(s3["options"]), "--data.cache_dir", str(cache)],
                   cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "tiny" / "version_0"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    assert len(events.Scalars("val/loss")) == 2  # validated at steps 2 and 4
    assert list(cache.rglob("chunk-*.bin"))  # the shards were streamed into the cache we named


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_the_local_ones(s3, prepared, tmp_path, workers):
    url = f"s3://{BUCKET}/copy"
    upload_dataset(prepared, ObjectStore(url, s3["options"]))
    local = attach(TokenDataModule(str(prepared), batch_size=4, num_workers=workers))
    remote = attach(TokenDataModule(url, batch_size=4, num_workers=workers, storage_options=s3["options"],
                                    cache_dir=str(tmp_path)))
    for dm in (local, remote):
        dm.setup("fit")
    pairs = list(zip(local.train_dataloader(), remote.train_dataloader(), strict=True))
    assert len(pairs) > 5 and all(torch.equal(a, b) for a, b in pairs)
    assert all(torch.equal(a, b) for a, b in zip(local.val_dataloader(), remote.val_dataloader(), strict=True))


@pytest.mark.slow
def test_missing_bucket_or_prefix_is_a_one_line_error(s3, tmp_path, capsys, monkeypatch):
    from lm_pretrain.commands.train import main

    monkeypatch.chdir(tmp_path)
    flags = ["--data.storage_options", json.dumps(s3["options"]), "--data.cache_dir", str(tmp_path / "cache")]
    line = cli_error(main, [*train_args("s3://no-such-bucket/data", max_steps=2)[1:], *flags], capsys)
    assert "bucket 'no-such-bucket' does not exist" in line, line
    line = cli_error(main, [*train_args(f"s3://{BUCKET}/nothing-here", max_steps=2)[1:], *flags], capsys)
    assert "is not a prepared dataset (no metadata.json)" in line, line


def test_credentials_endpoint_and_options_errors(s3, remote_data, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(UserError, match=f"endpoint {closed} is unreachable"):
        load_metadata(remote_data, {"endpoint_url": closed})
    with pytest.raises(UserError, match="unknown option.*endpoint"):
        load_metadata(remote_data, {"endpoint": s3["endpoint"]})
    with pytest.raises(UserError, match="Invalid endpoint"):
        load_metadata(remote_data, {"endpoint_url": "127.0.0.1:9000"})
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(UserError, match="no credentials; set AWS_ACCESS_KEY_ID"):
        load_metadata(remote_data, s3["options"])


def test_shards_are_checked_by_size(s3, prepared, tmp_path):
    url = f"s3://{BUCKET}/damaged"
    store = ObjectStore(url, s3["options"])
    upload_dataset(prepared, store)
    chunk = sorted((prepared / "train").glob("*.bin"))[0]
    short = tmp_path / chunk.name
    short.write_bytes(chunk.read_bytes()[:-7])
    store.upload(short, f"train/{chunk.name}")
    dm = attach(TokenDataModule(url, storage_options=s3["options"], cache_dir=str(tmp_path / "cache")))
    with pytest.raises(UserError, match=f"{url}/train/{chunk.name} has .* bytes, expected .*truncated"):
        dm.setup("fit")
    store.upload(chunk, f"train/{chunk.name}")
    dm.setup("fit")  # whole again
    store.delete([f"val/{sorted((prepared / 'val').glob('*.bin'))[0].name}"])
    with pytest.raises(UserError, match="is missing; prepare the data again"):
        dm.setup("fit")


def test_a_failed_upload_never_looks_finished(s3, corpus, monkeypatch):
    url = f"s3://{BUCKET}/replaced"
    store = ObjectStore(url, s3["options"])
    inputs = find_inputs([str(corpus[0])])
    prepare(inputs, url, workers=1, storage_options=s3["options"])
    first = store.read("metadata.json")
    with pytest.raises(UserError, match="already exists; pass --overwrite to replace it"):
        prepare(inputs, url, workers=1, storage_options=s3["options"])

    real_upload, calls = ObjectStore.upload, []

    def fails_on_the_second_file(self, path, name):
        calls.append(name)
        if len(calls) == 2:  # the connection drops
            with self.reporting("write"):
                raise EndpointConnectionError(endpoint_url=s3["endpoint"])
        return real_upload(self, path, name)

    monkeypatch.setattr(ObjectStore, "upload", fails_on_the_second_file)
    with pytest.raises(UserError, match="unreachable.*before metadata.json was written.*run the command again"):
        prepare(inputs, url, workers=1, seed=9, overwrite=True, storage_options=s3["options"])
    assert store.read("metadata.json") is None  # the old one went first: no mix of old and new
    with pytest.raises(UserError, match="not a prepared dataset"):
        load_metadata(url, s3["options"])

    monkeypatch.setattr(ObjectStore, "upload", real_upload)
    metadata = prepare(inputs, url, workers=1, seed=9, storage_options=s3["options"])  # no --overwrite needed now
    assert store.read("metadata.json") != first and load_metadata(url, s3["options"])["seed"] == 9
    listed = {n for n in store.sizes() if n != "metadata.json"}
    assert listed == {f"{split}/{s['file']}" for split in ("train", "val") for s in metadata["shards"][split]}


def test_litdata_still_has_the_client_options_we_extend():
    """let_litdata_use_http_endpoints extends a private module constant of litdata (its obstore client
    options): fail here if litdata renames it, rather than silently refusing http:// endpoints."""
    from litdata.streaming import downloader

    assert isinstance(getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None), dict)


def test_a_silent_endpoint_fails_within_the_stated_bound(monkeypatch):
    """An endpoint that accepts the connection and never answers: our client gives up after
    max_attempts x (connect_timeout + read_timeout) plus the backoff, in one line. The defaults bound
    that under 30 s; the test runs with short settings (the same code path) to stay quick."""
    import threading
    import time

    from lm_pretrain.data.storage import worst_case_seconds

    assert worst_case_seconds() < 30 and worst_case_seconds() == 3 * (2 + 5) + 1 + 2
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    silent, held = socket.socket(), []
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    threading.Thread(target=lambda: [held.append(silent.accept()) for _ in range(16)], daemon=True).start()
    options = {"endpoint_url": f"http://127.0.0.1:{silent.getsockname()[1]}", "read_timeout": 1, "max_attempts": 2}
    started = time.perf_counter()
    with pytest.raises(UserError, match=r"is unreachable \(ReadTimeoutError, gave up after 2 attempts\)"):
        ObjectStore("s3://bucket/data", options).read("metadata.json")
    assert time.perf_counter() - started < worst_case_seconds(options) + 1
    assert len(held) == 2  # two attempts, as set
    for bad in ({"read_timeout": 0}, {"max_attempts": 1.5}, {"connect_timeout": True}):
        with pytest.raises(UserError, match=f"storage_options: {next(iter(bad))}"):
            ObjectStore("s3://bucket/data", bad)
    silent.close()
