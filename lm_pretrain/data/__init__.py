"""Corpora in, batches out.

    storage.py          prepared datasets in S3-compatible object storage
    readers.py          one reader per input format (.txt, .jsonl(.gz/.zst/.bz2/.xz), .parquet,
                        Hugging Face datasets); a compressed or Arrow file cut short is refused
    downstream.py       multiple-choice benchmark questions (HellaSwag, ARC, ...) read from files
    prepared.py         what a prepared dataset is: its metadata, and the checks that it is intact
    prepare.py          raw text -> a prepared dataset of litdata token shards (lm-pretrain-prepare)
    train_tokenizer.py  a BPE of your own from your corpus (lm-pretrain-tokenizer)
    built_in.py         the built-in corpus (Shakespeare), made on first use: the one place a run
                        creates data
    datamodule.py       TokenDataModule: windows of token shards for training and (evenly split)
                        validation, cut into inputs and targets
"""
