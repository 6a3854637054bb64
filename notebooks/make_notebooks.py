"""Write notebooks 01-05 from the cell sources below, without outputs: `python notebooks/make_notebooks.py`.

Edit the cells here rather than in Jupyter, so the saved notebooks stay clean (no outputs, stable
cell ids) and their diffs stay readable. tests/test_notebooks.py executes the results headless.

`--render` also executes every notebook (after the demo, whose data and runs they read) and writes
docs/notebooks/NAME.md with its outputs and plots: what GitHub shows of a notebook without outputs
is its code, so each notebook links to its rendered copy.
"""

import base64
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
import os
from pathlib import Path

import lm_pretrain  # installed by scripts/setup.sh (pip install -e .): the notebook runs from any folder

ROOT = Path(lm_pretrain.__file__).resolve().parents[1]  # the repository: the demo's data/ and runs/
'''

KERNEL = {"display_name": "Python (lm-pretrain)", "language": "python", "name": "lm-pretrain"}


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


# ---------------------------------------------------------------------------------------------
# 01: the prepared data

DATA = [
    md('''
# 01 · What is in a prepared dataset?

`lm-pretrain-prepare` turns text into token shards: `DIR/train` and `DIR/val` hold litdata
chunks of token ids (uint16; GPT-2's unless `--tokenizer` named another), each document followed by
the end-of-text token (`<|endoftext|>`), and `DIR/metadata.json` says what went in. This notebook reads all of it back, so you can
check the data before spending GPU hours on it: counts, document lengths, decoded text, frequent tokens.

Set `LM_PRETRAIN_DATA_DIR` to look at another dataset (default: the demo's `data/shakespeare-bpe2k`,
which its first run makes: Shakespeare with a 2,048-token tokenizer trained on it; `data/shakespeare`
holds it with GPT-2's).
'''),
    code(SETUP + '''
import json

import numpy as np

from lm_pretrain.data.prepared import load_metadata
from lm_pretrain.tokenizer.encoding import from_record

data_dir = Path(os.environ.get("LM_PRETRAIN_DATA_DIR") or ROOT / "data" / "shakespeare-bpe2k")
metadata = load_metadata(data_dir)  # a one-line error if the folder is not a finished dataset
enc = from_record(metadata)  # GPT-2's, or the copy of a tokenizer of your own that the dataset keeps
EOT = metadata["eot_id"]
print(f"dataset: {data_dir}")
'''),
    md('''
## Metadata
Documents, not tokens, are split between train and val (by `--val_fraction`, with a fixed seed), so
no text appears in both. Each source file is listed with its size and SHA-256, so you can tell later
exactly which text a model was trained on.
'''),
    code('''
print(f"tokenizer: {metadata['tokenizer']} (vocabulary {metadata['vocab_size']:,}, end-of-text id {EOT}), "
      f"stored as {metadata['dtype']}")
print(f"split: val fraction {metadata['val_fraction']}, seed {metadata['seed']}; "
      f"skipped (empty or undecodable) documents: {metadata['skipped_documents']}")
for split, counts in metadata["splits"].items():
    print(f"{split}: {counts['documents']:,} documents, {counts['tokens']:,} tokens "
          f"({counts['tokens'] / max(counts['documents'], 1):,.0f} tokens per document)")

sources = metadata["sources"]
print(f"\\n{len(sources)} source files, {sum(s['bytes'] for s in sources) / 1e6:.1f} MB of text:")
for s in sources[:10]:
    print(f"  {Path(s['path']).name:<45} {s['bytes']:>12,} bytes {s['documents']:>6,} documents  sha256 {s['sha256'][:12]}…")
if len(sources) > 10:
    print(f"  ... and {len(sources) - 10} more")
'''),
    md('''
## Reading the tokens back
Each split is a folder of litdata chunk files listed in `index.json`. A chunk (TokensLoader format)
starts with a small header (the number of items and their byte offsets, uint32) followed by the token
ids back to back, so the whole stream can be mapped straight from disk with numpy.

The trainer does not see documents: litdata's `StreamingDataset` with `TokensLoader(block_size=T + 1)`
cuts the stream into windows of T + 1 tokens (inputs and their next-token targets), ignoring document
boundaries; the end-of-text tokens tell the model where one document stops. The check below confirms
that the first window the trainer would get is the start of the stream we read.
'''),
    code('''
from litdata import StreamingDataset, TokensLoader

def read_tokens(split_dir: Path, dtype: str) -> np.ndarray:
    """Every token of a split, in order, from its litdata chunks."""
    index = json.loads((split_dir / "index.json").read_text())
    parts = []
    for chunk in index["chunks"]:
        header = (1 + chunk["chunk_size"] + 1) * 4  # item count + (items + 1) offsets, uint32 each
        parts.append(np.memmap(split_dir / chunk["filename"], dtype=dtype, mode="r", offset=header))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

tokens = {split: read_tokens(data_dir / split, metadata["dtype"]) for split in metadata["splits"]}
for split, stream in tokens.items():
    expected = metadata["splits"][split]["tokens"]
    print(f"{split}: read {len(stream):,} tokens back (metadata: {expected:,})")
    assert len(stream) == expected, "token count does not match metadata.json"

BLOCK_SIZE = 128  # the tiny config's context; the trainer reads windows of BLOCK_SIZE + 1 tokens
windows = StreamingDataset(str(data_dir / "train"), item_loader=TokensLoader(block_size=BLOCK_SIZE + 1))
if len(windows):
    first = windows[0].numpy()
    print(f"\\nStreamingDataset: {len(windows):,} training windows of {BLOCK_SIZE + 1} tokens; "
          f"first window matches the stream: {bool((first == tokens['train'][:BLOCK_SIZE + 1]).all())}")
else:
    print(f"\\nStreamingDataset: no window of {BLOCK_SIZE + 1} tokens fits in a chunk of this small dataset")
'''),
    md('''
## Document lengths
Splitting each stream at the end-of-text tokens gives the documents back. Very short documents
(headers, boilerplate) or a few huge ones dominating the token count are worth knowing about.
'''),
    code('''
import matplotlib.pyplot as plt

def documents(stream: np.ndarray) -> list[np.ndarray]:
    """The documents of a token stream, each without its end-of-text token."""
    ends = np.flatnonzero(stream == EOT)
    starts = np.concatenate(([0], ends[:-1] + 1))
    docs = [stream[s:e] for s, e in zip(starts, ends)]
    if len(stream) and (not len(ends) or ends[-1] != len(stream) - 1):
        docs.append(stream[(ends[-1] + 1 if len(ends) else 0):])  # a stream should end with EOT; keep any tail
    return docs

docs = {split: documents(stream) for split, stream in tokens.items()}
lengths = {split: np.array([len(d) for d in split_docs]) for split, split_docs in docs.items()}
for split, n in lengths.items():
    print(f"{split}: {len(n):,} documents (metadata: {metadata['splits'][split]['documents']:,}); "
          f"tokens per document min {n.min():,}, median {int(np.median(n)):,}, max {n.max():,}")

fig, ax = plt.subplots(figsize=(7, 4))
all_lengths = np.concatenate(list(lengths.values()))
bins = np.histogram_bin_edges(all_lengths, bins=min(30, max(5, len(all_lengths) // 2)))
for split, n in lengths.items():
    ax.hist(n, bins=bins, alpha=0.7, label=f"{split} ({len(n)} documents)")
ax.set_xlabel("document length (tokens, without end-of-text)")
ax.set_ylabel("documents")
ax.set_title(f"Document lengths in {data_dir.name}")
ax.legend()
ax.grid(alpha=0.3)
plt.show()
'''),
    md('''
## A few documents, decoded
The first 200 tokens of a couple of training documents, decoded with the dataset's tokenizer: this is
exactly the text the model learns from (a quick way to spot encoding trouble or leftover markup).
'''),
    code('''
for i, doc in enumerate(docs["train"][:2]):
    print(f"--- train document {i} ({len(doc):,} tokens), first 200 ---")
    print(enc.decode(doc[:200].tolist()))
    print()
'''),
    md('''
## The most frequent tokens
Counts over the training split (the end-of-text separator left out). With GPT-2's tokenizer, as with
one of your own (GPT-4's split pattern), a leading space is part of the token, so `' the'` and `'the'` are
different ids; newlines and punctuation are
near the top for most English text.
'''),
    code('''
counts = np.bincount(tokens["train"], minlength=metadata["vocab_size"])
counts[EOT] = 0
total = counts.sum()
print(f"{'rank':>4}  {'id':>6}  {'token':<16} {'count':>10}  share")
for rank, token_id in enumerate(np.argsort(counts)[::-1][:20], start=1):
    print(f"{rank:>4}  {token_id:>6}  {enc.decode([int(token_id)])!r:<16} {counts[token_id]:>10,}  "
          f"{counts[token_id] / total:6.2%}")
print(f"\\n{(counts > 0).sum():,} of {metadata['vocab_size']:,} token ids occur in the training split")
'''),
]


# ---------------------------------------------------------------------------------------------
# 02: training curves of several runs

CURVES = [
    md('''
# 02 · Training curves of several runs

Every `train.py fit` writes TensorBoard logs to `runs/NAME/version_N/`. This notebook reads them with
TensorBoard's `EventAccumulator` (no TensorBoard server needed) and draws the runs side by side: train
and validation loss, the learning-rate schedule, and a summary table.

Set `LM_PRETRAIN_RUNS` to the run folders to compare, separated by `os.pathsep` (`:` on Linux and
macOS, `;` on Windows), e.g. `runs/tiny/version_0:runs/tiny-llama/version_0`. Default: every
`runs/*/version_*` folder.
'''),
    code(SETUP + '''
import math

import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

def version(path: Path) -> int:
    tail = path.name.rpartition("_")[2]
    return int(tail) if tail.isdigit() else -1

if os.environ.get("LM_PRETRAIN_RUNS"):
    run_dirs = [Path(p) for p in os.environ["LM_PRETRAIN_RUNS"].split(os.pathsep) if p]
else:
    run_dirs = sorted(ROOT.glob("runs/*/version_*"), key=lambda p: (p.parent.name, version(p)))

runs = {}  # label -> {tag: (steps, values)}
for run_dir in run_dirs:
    if not any(run_dir.glob("events.out.tfevents.*")):
        print(f"skipped {run_dir}: no TensorBoard event files")
        continue
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0 = keep every point
    events.Reload()
    label = f"{run_dir.parent.name}/{run_dir.name}"
    if label in runs:  # two runs of the same name from different folders
        label = f"{label} #{sum(key.startswith(label) for key in runs) + 1}"
    runs[label] = {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
                   for tag in events.Tags()["scalars"]}
    print(f"{label}: {run_dir}")
    print(f"    tags: {', '.join(sorted(runs[label]))}")
if not runs:
    raise FileNotFoundError("no runs with TensorBoard logs: train one with python train.py fit --config configs/tiny.yaml")
'''),
    md('''
## Loss
Train loss is logged every `log_every_n_steps` optimizer steps (one batch each, so it is noisy);
validation loss at each validation, over `limit_val_batches` batches of held-out documents. A val
curve that turns upward while train loss keeps falling means overfitting (rare in pre-training, where
the data is seen about once). Both are cross-entropy in nats per token: ln(vocabulary) is chance (10.8 for GPT-2's 50,257 tokens, 7.6
for the demo's 2,048), so compare runs of different tokenizers in bits per byte (`val/bpb`).
'''),
    code('''
def curve(label: str, tag: str):
    """(steps, values) of a tag, or None when the run did not log it."""
    return runs[label].get(tag)

colors = {label: f"C{i % 10}" for i, label in enumerate(runs)}  # one colour per run in every plot

fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
for ax, tag in zip(axes, ("train/loss", "val/loss")):
    for label in runs:
        points = curve(label, tag)
        if points is None:
            print(f"{label}: no {tag} logged")
            continue
        ax.plot(*points, marker="o" if tag.startswith("val") else None, markersize=4, color=colors[label], label=label)
    ax.set_title(tag)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
axes[0].set_ylabel("cross-entropy (nats/token)")
max(axes, key=lambda ax: len(ax.lines)).legend()  # the axis that shows every run, if any does
plt.tight_layout()
plt.show()
'''),
    md('''
## Learning rate
`LearningRateMonitor` logs the schedule (linear warmup, then cosine decay to `min_lr_ratio` of the
peak) per optimizer parameter group: `lr-AdamW/decay` for the weights with weight decay (older runs
named the groups `pg1`, `pg2`; the first `lr-` tag is used then).
'''),
    code('''
def lr_tag(label: str) -> str | None:
    tags = sorted(tag for tag in runs[label] if tag.startswith("lr-"))
    return "lr-AdamW/decay" if "lr-AdamW/decay" in tags else (tags[0] if tags else None)

fig, ax = plt.subplots(figsize=(7, 4))
for label in runs:
    tag = lr_tag(label)
    if tag is None:
        print(f"{label}: no learning rate logged")
        continue
    ax.plot(*curve(label, tag), color=colors[label], label=f"{label} ({tag})")
ax.set_xlabel("optimizer step")
ax.set_ylabel("learning rate")
ax.legend()
ax.grid(alpha=0.3)
plt.show()
'''),
    md('''
## Summary
Perplexity is exp(loss): the number of tokens the model is, on average, as unsure between as a uniform
guess. `n/a` marks a value the run did not log (for example a run stopped before its first validation).
'''),
    code('''
def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)

rows = []
for label in runs:
    train, val = curve(label, "train/loss"), curve(label, "val/loss")
    steps = max((points[0][-1] for points in runs[label].values() if points[0]), default=None)
    best_val = min(val[1]) if val else None
    rows.append((label, fmt(steps, "d"), fmt(train[1][-1] if train else None), fmt(best_val),
                 fmt(math.exp(best_val) if best_val is not None else None, ".1f")))

header = ("run", "last step", "final train loss", "best val loss", "val ppl")
widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
print("  ".join("-" * w for w in widths))
for row in rows:
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
'''),
]


# ---------------------------------------------------------------------------------------------
# 03: sampling settings

GENERATE = [
    md('''
# 03 · Sampling from a checkpoint

Loads a checkpoint written by `train.py` and continues one prompt under different sampling settings,
each with a fixed seed so every line here is reproducible. The same as
`lm-pretrain-generate --ckpt_path PATH --prompt TEXT --temperature T --top_k K --top_p P --seed S`.

Set `LM_PRETRAIN_CKPT` to sample another checkpoint (default: `last.ckpt` of the newest
`runs/tiny/version_N`). A tiny model trained for minutes writes Shakespeare-flavoured nonsense: the
point is how the settings change it.
'''),
    code(SETUP + '''
from lm_pretrain.commands.generate import load_model
from lm_pretrain.model.sampling import sample

def newest_run(runs: Path) -> Path:
    versions = sorted(runs.glob("version_*"), key=lambda p: int(p.name.rpartition("_")[2]))
    if not versions:
        raise FileNotFoundError(f"no run in {runs}: train one with python train.py fit --config configs/tiny.yaml")
    return versions[-1]

ckpt = Path(os.environ.get("LM_PRETRAIN_CKPT") or newest_run(ROOT / "runs" / "tiny") / "checkpoints" / "last.ckpt")
model = load_model(ckpt)  # on the CPU, in eval mode
print(f"checkpoint: {ckpt}")
print(f"model: {model.model.num_params():,} parameters, context {model.model.config.block_size} tokens")
'''),
    md('''
## One prompt, many settings
- **temperature** divides the logits before the softmax: below 1 sharpens the distribution (safer, more
  repetitive), above 1 flattens it (more varied, less coherent); 0 is greedy (always the likeliest token),
  which in a small model soon gets stuck repeating one token (often a newline, the commonest token).
- **top-k** samples only among the k likeliest tokens; top-k 1 is greedy again.
- **top-p** (nucleus) samples among the fewest likeliest tokens whose probabilities add up to p, so the
  number of candidates adapts to how sure the model is.

Sampling stops early if the model writes the end-of-text token.
'''),
    code('''
PROMPT = "ROMEO:"
MAX_NEW_TOKENS = 30
SEED = 0

settings = [
    {"temperature": 0.0, "top_k": None, "top_p": None},  # greedy
    {"temperature": 0.5, "top_k": None, "top_p": None},
    {"temperature": 1.0, "top_k": None, "top_p": None},
    {"temperature": 1.5, "top_k": None, "top_p": None},
    {"temperature": 1.0, "top_k": 1, "top_p": None},
    {"temperature": 1.0, "top_k": 10, "top_p": None},
    {"temperature": 1.0, "top_k": 200, "top_p": None},
    {"temperature": 1.0, "top_k": None, "top_p": 0.5},
    {"temperature": 1.0, "top_k": None, "top_p": 0.9},
]
print(f"{len(settings)} settings, prompt {PROMPT!r}, {MAX_NEW_TOKENS} new tokens, seed {SEED}\\n")
samples = []
for s in settings:
    samples.append(sample(model, PROMPT, max_new_tokens=MAX_NEW_TOKENS, seed=SEED, **s))
    print(f"--- temperature={s['temperature']} top_k={s['top_k']} top_p={s['top_p']} ---")
    print(samples[-1])
    print()
'''),
    md('''
## Seeds make samples reproducible
With `seed` set, `sample` draws from its own `torch.Generator`, so the same checkpoint, prompt, settings
and seed give the same text every time (on the same device and PyTorch version); another seed gives
another sample. Without a seed it uses PyTorch's global random state.
'''),
    code('''
s = settings[-1]  # the last setting above, sampled again with the same seed and with the next one
again = sample(model, PROMPT, max_new_tokens=MAX_NEW_TOKENS, seed=SEED, **s)
other = sample(model, PROMPT, max_new_tokens=MAX_NEW_TOKENS, seed=SEED + 1, **s)
print(f"temperature={s['temperature']} top_k={s['top_k']} top_p={s['top_p']}\\n")
print(f"seed {SEED} (above):\\n{samples[-1]}\\n")
print(f"seed {SEED} again:\\n{again}\\n")
print(f"seed {SEED + 1}:\\n{other}\\n")
print(f"same seed, same text: {again == samples[-1]}")
print(f"different seed, different text: {other != samples[-1]}")
'''),
]


# ---------------------------------------------------------------------------------------------
# 04: sizing the presets

SIZING = [
    md('''
# 04 · Sizing the presets: parameters, FLOPs, memory, time to train

For every preset in `configs/*.yaml`, computed from the config alone (no model is built, no GPU needed):
parameter counts and training FLOPs per token (`lm_pretrain.model.gpt.model_size`), a per-GPU memory
estimate (`lm_pretrain.training.hardware.training_memory_bytes`) and the days one GPU would take on a token
budget (`lm_pretrain.training.hardware.days_to_train`). Change the assumptions in the next cell.
'''),
    code(SETUP + '''
import yaml

from lm_pretrain.training.hardware import MEMORY_BYTES, PEAK_FLOPS, days_to_train, precision_key, training_memory_bytes
from lm_pretrain.model import model_size
from lm_pretrain.commands.sizes import config_from_yaml

TOKENS_PER_PARAM = 20  # "Chinchilla-optimal" budget (Hoffmann et al. 2022): ~20 training tokens per parameter
FIXED_TOKENS = 10e9  # a fixed budget for comparison: 10B tokens
MFU = 0.4  # assumed model FLOPs utilization; 40-50 % is good for a GPT on one GPU
PRECISION = "bf16-mixed"  # GPUs without bf16 (V100, T4) are costed at fp16
GPUS = 1

presets = sorted(ROOT.glob("configs/*.yaml"))
configs = {p.stem: config_from_yaml(p) for p in presets}
batch_sizes = {p.stem: ((yaml.safe_load(p.read_text()) or {}).get("data") or {}).get("batch_size", 8) for p in presets}

def print_table(header, rows):
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in (list(header), *rows)) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))

def millions(n):
    return f"{n / 1e6:,.1f}M" if n >= 1e5 else f"{n / 1e6:,.3f}M"

print(f"{len(presets)} presets in {ROOT / 'configs'}")
'''),
    md('''
## Parameters and FLOPs per token
Non-embedding parameters leave out the token and position tables (scaling laws are usually stated in
them). FLOPs per token count forward + backward: 6 per weight per token plus attention over a full
context (the PaLM formula also used for MFU in training).
'''),
    code('''
rows = []
for name, c in configs.items():
    size = model_size(c)
    rows.append([name, "GPT-2" if c.position == "learned" else "Llama", c.n_layer, c.n_embd,
                 f"{c.n_head} ({c.n_kv_head})", c.block_size, millions(size["params"]),
                 millions(size["non_embedding_params"]), f"{size['flops_per_token'] / 1e9:.3f}"])
print_table(["preset", "blocks", "layers", "width", "heads (kv)", "context", "params", "non-embedding",
             "GFLOPs/token"], rows)
'''),
    md('''
## Memory per GPU
Weights, gradients and AdamW state take 16 bytes per parameter (fp32 master weights and moments under
mixed precision); activations grow with batch size × context × layers. The batch size is each config's
`data.batch_size` (per GPU). Activation checkpointing keeps only each block's input and recomputes the
rest in the backward pass (about a third more compute).

**This is a rough estimate, not a promise** (see the docstring of `training_memory_bytes`):
`torch.compile` fuses some activations away (GPT-2 124M at batch 32 peaked at ~15.5 GiB on an H200 with
compile, where this estimate says 20.6 GiB), while the CUDA allocator's slack and temporary buffers add
some back. Leave headroom; FSDP (`shards`) divides the 16 bytes per parameter among GPUs.
'''),
    code('''
GiB = 2**30
by_memory = sorted(MEMORY_BYTES, key=MEMORY_BYTES.get)

def smallest_fit(total: float) -> str:
    return next((gpu for gpu in by_memory if total <= MEMORY_BYTES[gpu]), "none (shard or shrink)")

rows = []
for name, c in configs.items():
    plain = training_memory_bytes(c, batch_sizes[name])
    ckpt = training_memory_bytes(c, batch_sizes[name], activation_checkpointing=True)
    rows.append([name, batch_sizes[name], f"{plain['states'] / GiB:.1f}", f"{plain['activations'] / GiB:.1f}",
                 f"{plain['total'] / GiB:.1f}", f"{ckpt['total'] / GiB:.1f}", smallest_fit(plain["total"]),
                 smallest_fit(ckpt["total"])])
print_table(["preset", "batch", "states GiB", "activations GiB", "total GiB", "with act. ckpt GiB",
             "smallest GPU that fits", "... with act. ckpt"], rows)
print("\\nGPU memory: " + ", ".join(f"{gpu} {MEMORY_BYTES[gpu] / 1e9:.0f} GB" for gpu in by_memory))
'''),
    md('''
## Time to train
days = tokens × FLOPs per token / (peak FLOP/s × MFU × GPUs), with the dense tensor-core peaks of
`PEAK_FLOPS` (H100 and H200 are the SXM parts). Real runs also spend time on evaluation, checkpointing and data
loading, and small models rarely reach a large GPU's MFU, so read these as lower bounds. Time is shown
in minutes (min), hours (h), days (d) or years (y).
'''),
    code('''
def gpu_precision(gpu: str) -> str:
    return PRECISION if precision_key(PRECISION) in PEAK_FLOPS[gpu] else "16-mixed"

def duration(days: float) -> str:
    if days == float("inf"):
        return "n/a"
    if days < 1 / 24:
        return f"{days * 1440:.1f} min"
    if days < 1:
        return f"{days * 24:.1f} h"
    if days < 365:
        return f"{days:.1f} d"
    return f"{days / 365:.1f} y"

gpus = list(PEAK_FLOPS)
header = ["preset", "tokens"] + [f"{gpu} ({precision_key(gpu_precision(gpu))})" for gpu in gpus]
for title, budget in ((f"{TOKENS_PER_PARAM} tokens per parameter", lambda c: TOKENS_PER_PARAM * model_size(c)["params"]),
                      (f"a fixed {FIXED_TOKENS / 1e9:g}B tokens", lambda c: FIXED_TOKENS)):
    print(f"Time to train on {title}, {GPUS} GPU(s) at MFU {MFU:.0%}:")
    rows = []
    for name, c in configs.items():
        tokens = budget(c)
        rows.append([name, f"{tokens / 1e9:,.2f}B"] +
                    [duration(days_to_train(c, tokens, gpu, gpus=GPUS, mfu=MFU, precision=gpu_precision(gpu)))
                     for gpu in gpus])
    print_table(header, rows)
    print()
'''),
]


# ---------------------------------------------------------------------------------------------
# 05: an experiment, trained here

EXPERIMENT = [
    md('''
# 05 · An experiment: train a baseline and variants, compare them here

Each run is what `python train.py fit --config configs/tiny.yaml --KEY VALUE ...` would start, built by
the same parser, defaults and checks (`lm_pretrain.experiment`), and trained in this notebook. All runs
see the same tokens in the same order (one seed, one `max_steps`), so their curves and validation
scores compare. **Change a line of `VARIANTS`** (any `--model.*`, `--data.*` or `--trainer.*` flag,
without the dashes) and run all cells: a few minutes on a laptop CPU.
'''),
    code(SETUP + '''
import time

import matplotlib.pyplot as plt

import lm_pretrain

STEPS = int(os.environ.get("LM_PRETRAIN_NOTEBOOK_STEPS", 300))  # optimizer steps per run (the tests: fewer)
CONFIG = ROOT / "configs" / "tiny.yaml"  # the demo's model and recipe
SHARED = {
    "trainer.max_steps": STEPS,
    "trainer.val_check_interval": STEPS,  # validate once, at the end
    "trainer.log_every_n_steps": max(1, STEPS // 30),  # ~30 points per curve
    "trainer.callbacks": [],  # no text samples
    "trainer.enable_progress_bar": False,
    "trainer.logger.init_args.name": "experiment",  # runs/experiment/version_N: TensorBoard compares them too
    "trainer.logger.init_args.save_dir": os.environ.get("LM_PRETRAIN_RUNS_DIR") or str(ROOT / "runs"),
    "data.data_dir": os.environ.get("LM_PRETRAIN_DATA_DIR") or str(ROOT / "data" / "shakespeare-bpe2k"),
}
VARIANTS = {
    "baseline (SwiGLU)": {},
    "relu² MLP": {"model.mlp": "relu2", "model.mlp_hidden": 512},  # ~ the same parameters as SwiGLU's 352 x 3
    "lr 1e-3": {"model.learning_rate": 0.001},
}
'''),
    code('''
runs = {}
for name, changes in VARIANTS.items():
    run = lm_pretrain.experiment(CONFIG, {**SHARED, **changes})
    run.fit()
    runs[name] = run
    print(f"{name}: val/loss {run.metrics['val/loss']:.3f}, {run.seconds:.0f} s ({run.log_dir.name})")
'''),
    md('''
## Curves
Training loss per optimizer step (the mean over the step's batches), against the tokens seen.
'''),
    code('''
fig, ax = plt.subplots(figsize=(8, 4))
for name, run in runs.items():
    tokens_per_step = run.datamodule.batch_size * run.model.config.block_size * run.trainer.accumulate_grad_batches
    steps, losses = zip(*run.curve("train/loss"))
    ax.plot([(s + 1) * tokens_per_step / 1e3 for s in steps], losses, label=name)
ax.set_xlabel("training tokens (thousands)")
ax.set_ylabel("train/loss (nats per token)")
ax.legend()
plt.show()
'''),
    md('''
## Scores
Validation on the same windows for every run. Bits per byte compare across tokenizers too; lower is
better. Differences of a few hundredths at this size can be noise: rerun with another
`seed_everything` before trusting one.
'''),
    code('''
baseline = next(iter(runs.values())).metrics["val/bpb"]
print(f"{'run':<22}{'val/loss':>10}{'val/bpb':>10}{'vs baseline':>13}{'params':>10}{'seconds':>9}")
for name, run in runs.items():
    params = sum(p.numel() for p in run.model.parameters())
    print(f"{name:<22}{run.metrics['val/loss']:>10.3f}{run.metrics['val/bpb']:>10.3f}"
          f"{run.metrics['val/bpb'] - baseline:>+13.3f}{params / 1e6:>9.2f}M{run.seconds:>9.0f}")
'''),
    md('''
Every run also sits in `runs/experiment/version_N` with its `config.yaml` and checkpoints: rerun one
from the shell with `python train.py fit --config runs/experiment/version_N/config.yaml`, or compare
them all in TensorBoard (`tensorboard --logdir runs/experiment`), whose HParams tab lists each run's
settings beside its val/loss and val/bpb.
'''),
]


NOTEBOOKS = {"01_data.ipynb": DATA, "02_training_curves.ipynb": CURVES, "03_generate.ipynb": GENERATE,
             "04_sizing.ipynb": SIZING, "05_experiment.ipynb": EXPERIMENT}


def build(cells: list, stem: str) -> nbformat.NotebookNode:
    cells = [md(cells[0].source + "\n\n" + rendered_link(stem)), *cells[1:]]
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": KERNEL,  # this repository's .venv, registered by scripts/setup.sh
        "language_info": {"name": "python"},
    })
    for i, cell in enumerate(nb.cells):
        cell.id = f"{stem.split('_')[0]}-{i:02d}"  # stable ids: regenerating gives the same file
    return nb


RENDERED = HERE.parent / "docs" / "notebooks"  # each notebook with the outputs of one run, readable on GitHub
MACHINE_PATHS = re.compile(r"(?<![\w.])(/[\w.+-]+)+/(?=[\w.-])")  # an absolute folder outside the repository


def rendered_link(stem: str) -> str:
    return f"Read it with the outputs of a real run: [docs/notebooks/{stem}.md](../docs/notebooks/{stem}.md)."


def render(name: str) -> Path:
    """Execute notebooks/NAME (after the demo, whose data and runs it reads) and write
    docs/notebooks/STEM.md: its cells, its printed output and its plots (STEM/N.png). No machine's
    paths, ids or timestamps: rendering again after the same run writes the same files."""
    from nbclient import NotebookClient

    nb = nbformat.read(HERE / name, as_version=4)
    NotebookClient(nb, timeout=1800, kernel_name=nb.metadata.kernelspec.name,
                   resources={"metadata": {"path": str(HERE)}}).execute()
    stem, root = Path(name).stem, str(HERE.parent)
    images = RENDERED / stem
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    parts = [f"<!-- notebooks/{name} with its outputs, written by `python notebooks/make_notebooks.py --render` "
             f"after the demo: edit the notebook, not this file. -->"]
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(cell.source.replace(rendered_link(stem), f"(The notebook: [notebooks/{name}](../../notebooks/{name}).)"))
            continue
        parts.append(f"```python\n{cell.source}\n```")
        printed = ""  # consecutive prints as one block
        for output in [*cell.outputs, {"output_type": "end"}]:
            if output["output_type"] == "stream" and output["name"] == "stdout":
                printed += output["text"]
                continue
            if printed:
                parts.append(f"```text\n{MACHINE_PATHS.sub('', printed.replace(root, '.')).rstrip()}\n```")
                printed = ""
            if "image/png" in output.get("data", {}):
                image = images / f"{len(list(images.iterdir())):02d}.png"
                image.write_bytes(base64.b64decode(output.data["image/png"]))
                parts.append(f"![output]({stem}/{image.name})")
    out = RENDERED / f"{stem}.md"
    out.write_text("\n\n".join(parts) + "\n")
    return out


def main(argv: list[str]) -> None:
    for name, cells in NOTEBOOKS.items():
        nb = build(cells, Path(name).stem)
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print(f"wrote {HERE / name}")
    if "--render" in argv:
        # The experiment's runs go to a folder of their own, left behind: none of them is the
        # user's, and the curves notebook (which lists runs/) and every render stay the same.
        os.environ["LM_PRETRAIN_RUNS_DIR"] = tempfile.mkdtemp(prefix="lm-pretrain-render-")
        for name in [*NOTEBOOKS, "quickstart.ipynb"]:
            print(f"wrote {render(name)}")


if __name__ == "__main__":
    main(sys.argv[1:])
