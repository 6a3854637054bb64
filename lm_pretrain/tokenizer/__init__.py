"""Tokenizers: what turns text into token ids and back.

    bpe.py       training a byte-level BPE (rustbpe, or Hugging Face tokenizers) and the tokenizer
                 file that holds one
    encoding.py  tiktoken encodings by name (with an offline path for GPT-2) or from a tokenizer
                 file; how datasets and checkpoints record theirs
"""
