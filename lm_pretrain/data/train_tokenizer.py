"""lm-pretrain-tokenizer: train a byte-level BPE tokenizer on your corpus, for prepare and training.

    lm-pretrain-tokenizer my_corpus/ --vocab_size 8192 --output my_tokenizer.json
    lm-pretrain-prepare my_corpus/ --tokenizer my_tokenizer.json --output data/mine
    python train.py fit --config configs/tiny.yaml --data.data_dir data/mine   # vocab_size 8192: the data's

It reads the same inputs and formats as lm-pretrain-prepare and, by default, leaves out the documents
that prepare puts into validation with the same --val_fraction and --seed (so val bits per byte stay
honest: the tokenizer never saw them). A character budget (--max_chars) bounds the work on a large
corpus: each input gets an equal share of it (an input with less text leaves the rest to the inputs
after it), read from its start. The trainer counts words as the text streams past, so memory grows
with the number of distinct words, not with the corpus. The result is one file (lm_pretrain/tokenizer/bpe.py)
that every command takes wherever it takes a tokenizer name; prepared datasets and checkpoints keep
a copy of it, so nothing later needs the file itself.
"""

import logging
import time
from pathlib import Path

from lm_pretrain.tokenizer import bpe
from lm_pretrain.utils import ranges
from lm_pretrain.utils.errors import UserError
from lm_pretrain.utils.files import check_can_create, refuse_output_over_inputs
from lm_pretrain.data.prepare import CORPORA, Corpus, split_documents
from lm_pretrain.utils.ranges import Characters, OpenUnitInterval, Seed, VocabSize
from lm_pretrain.data.readers import (DEFAULT_TEXT_KEY, SURROGATES_REPLACED, EncodingErrors, Input, ReadOptions, find_inputs,
                                  read_documents)
from lm_pretrain.tokenizer.encoding import encoding_from_ranks, get_tokenizer, is_tiktoken_name, segments

log = logging.getLogger("lm_pretrain.data.train_tokenizer")

VAL_SAMPLE_CHARS = 5_000_000  # held-out text kept to report the new tokenizer's compression on


def train_tokenizer(output: str, vocab_size: VocabSize, inputs: list[str] | None = None, corpus: Corpus | None = None,
                    hf_dataset: str | None = None, hf_config: str | None = None, hf_split: str = "train",
                    text_key: str = DEFAULT_TEXT_KEY, max_chars: Characters = 2_000_000_000,
                    hold_out_val: bool = True, val_fraction: OpenUnitInterval = 0.05, seed: Seed = 0,
                    trainer: bpe.Trainer = "rustbpe", name: str | None = None,
                    encoding_errors: EncodingErrors = "strict", overwrite: bool = False) -> dict:
    """Train a byte-level BPE tokenizer on a corpus and write it to one file.

    The file is a tiktoken encoding (ranks, split pattern, <|endoftext|>) that --tokenizer of
    lm-pretrain-prepare takes; see lm_pretrain/tokenizer/bpe.py for its format.

    Args:
        output: the tokenizer file to write (e.g. my_tokenizer.json).
        vocab_size: token ids in all, <|endoftext|> included (its id is vocab_size - 1); a model
            trained on data prepared with it takes this vocab_size unless given one.
        inputs: files, folders or globs, as lm-pretrain-prepare takes them; also given as INPUTs
            before the flags.
        corpus: a built-in corpus instead of inputs (shakespeare).
        hf_dataset: a dataset of the Hugging Face hub, streamed; with hf_config and hf_split.
        hf_config: the hub dataset's configuration.
        hf_split: the hub dataset's split.
        text_key: the field or column that holds each document's text.
        max_chars: at most this many characters of text are read for training, shared across inputs.
        hold_out_val: leave out the documents lm-pretrain-prepare puts into validation (with the same
            inputs, val_fraction and seed); costs one extra pass that counts the documents.
        val_fraction: as lm-pretrain-prepare's.
        seed: as lm-pretrain-prepare's.
        trainer: rustbpe (faster here; see BENCHMARKS.md) or hf (Hugging Face tokenizers).
        name: the tokenizer's name in the file; empty means the output file's name without .json.
        encoding_errors: non-UTF-8 bytes: strict fails, replace writes U+FFFD, skip drops the document.
        overwrite: replace OUTPUT if it exists.
    """
    ranges.check(train_tokenizer, {"vocab_size": vocab_size, "max_chars": max_chars, "val_fraction": val_fraction, "seed": seed,
                                   "corpus": corpus, "trainer": trainer, "encoding_errors": encoding_errors}, "")
    if vocab_size < 258:
        raise UserError(f"--vocab_size {vocab_size} is too small: the 256 single bytes and <|endoftext|> come first, "
                        "so at least 258")
    if sum(map(bool, (inputs, corpus, hf_dataset))) != 1:
        raise UserError("give INPUTs (files, folders or globs), --corpus shakespeare or --hf_dataset NAME (one of them)")
    out = Path(output)
    if out.is_dir():
        raise UserError(f"--output {out} is a folder; give the tokenizer file's path, e.g. {out / 'tokenizer.json'}")
    if hf_dataset:
        sources = [Input(hf_name=hf_dataset, hf_config=hf_config, hf_split=hf_split)]
    else:
        sources = [Input(p) for p in CORPORA[corpus]()] if corpus else find_inputs(inputs)
    refuse_output_over_inputs(out, {"INPUT": [*(inputs or []), *(s.path for s in sources)], "--hf_dataset": hf_dataset})
    if out.exists() and not overwrite:
        raise UserError(f"--output {out} exists; pass --overwrite to replace it")
    check_can_create(out.parent, "--output's folder")
    if is_tiktoken_name(name or out.name.removesuffix(".json")):
        raise UserError(f"the name {name or out.name.removesuffix('.json')!r} is a tiktoken encoding's (datasets and "
                        "checkpoints would confuse the two): give --name, or another --output file name")
    options = ReadOptions(text_key=text_key, errors=encoding_errors)

    is_val, offsets = None, None
    if hold_out_val:  # prepare numbers the non-empty documents of all inputs in order
        counts = [sum(1 for text in read_documents(source, options) if text is not None) for source in sources]
        offsets = [sum(counts[:i]) for i in range(len(sources))]
        try:
            is_val = split_documents(sum(counts), val_fraction, seed)
        except UserError as err:
            raise UserError(f"{err}; or pass --hold_out_val false") from None
    used, val_sample, repaired = {"documents": 0, "chars": 0, "val_chars": 0}, [], {}

    def training_texts():
        budget, started, last_report = max_chars, time.perf_counter(), 0.0
        for i, source in enumerate(sources):
            share, taken, index = budget // (len(sources) - i), 0, offsets[i] if offsets else 0
            for text in read_documents(source, options, repaired):
                if text is None:
                    continue
                index += 1
                if is_val is not None and is_val[index - 1]:
                    if used["val_chars"] < VAL_SAMPLE_CHARS:
                        val_sample.append(text)
                        used["val_chars"] += len(text)
                    continue
                if taken >= share:
                    break
                text = text[:share - taken]
                taken += len(text)
                used["documents"] += 1
                used["chars"] += len(text)
                if time.perf_counter() - last_report > 5:
                    last_report = time.perf_counter()
                    log.info("read %s characters of at most %s, %d documents (input %d of %d), %.0f s",
                             f"{used['chars']:,}", f"{max_chars:,}", used["documents"], i + 1, len(sources),
                             last_report - started)
                yield from segments(text)  # the trainer's memory, too, grows with its longest piece
            budget -= taken

    started = time.perf_counter()
    ranks = bpe.train(training_texts(), vocab_size - 1, trainer)
    seconds = time.perf_counter() - started
    if used["chars"] == 0:
        raise UserError("the inputs hold no text to train on (every document is empty, skipped or held out)")
    if repaired.get("surrogates"):
        log.warning(SURROGATES_REPLACED, repaired["surrogates"])
    name = name or out.name.removesuffix(".json")
    trained_on = {"inputs": [str(s) for s in sources[:20]] + ([f"... {len(sources) - 20} more"] if len(sources) > 20 else []),
                  "documents": used["documents"], "characters": used["chars"], "trainer": trainer,
                  "held_out_val": {"val_fraction": val_fraction, "seed": seed} if hold_out_val else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    sha = bpe.write(out, ranks, name, trained_on)
    summary = {"output": str(out), "sha256": sha, "vocab_size": len(ranks) + 1, "vocab_size_asked": vocab_size,
               "documents": used["documents"], "characters": used["chars"], "seconds": seconds}
    if len(ranks) + 1 < vocab_size:
        log.warning("warning: the text has only %d pairs left to merge: the tokenizer has %d ids, not %d; "
                    "set model.vocab_size to at least %d", len(ranks) - 256, len(ranks) + 1, vocab_size, len(ranks) + 1)
    log.info("trained %s tokens on %s characters (%d documents) in %.1f s; wrote %s (sha256 %s)",
             f"{len(ranks) + 1:,}", f"{used['chars']:,}", used["documents"], seconds, out, sha[:16])
    if val_sample:
        text = "".join(val_sample)
        ours = encoding_from_ranks(ranks, bpe.SPLIT_PATTERN, name)
        summary["val_bytes_per_token"] = len(text.encode()) / max(1, len(ours.encode_ordinary(text)))
        line = f"held-out val text: {summary['val_bytes_per_token']:.2f} bytes per token"
        try:
            gpt2 = get_tokenizer("gpt2")
            line += f" (GPT-2's: {len(text.encode()) / max(1, len(gpt2.encode_ordinary(text))):.2f})"
        except UserError:
            pass
        log.info(line)
    return summary
