"""lm-pretrain-tokenizer: train a byte-level BPE tokenizer on your corpus (`lm_pretrain.data.train_tokenizer`).

    lm-pretrain-tokenizer my_corpus/ --vocab_size 8192 --output my_tokenizer.json
"""

import sys

from lm_pretrain.commands.parsing import call_with_inputs, show_progress
from lm_pretrain.data.train_tokenizer import train_tokenizer
from lm_pretrain.utils.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    show_progress()
    call_with_inputs("lm-pretrain-tokenizer", train_tokenizer, argv)

if __name__ == "__main__":
    main(sys.argv[1:])
