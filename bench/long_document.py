"""Memory and time to tokenize one long document: in segments (as prepare does) or in one call.

    python bench/long_document.py [--mb 10 50] [--repeats 1]

Each case is one JSON line of `--mb` million characters, either letters without a space (one
pre-token: the worst case for tiktoken, ~50 bytes per character in one call) or words with spaces.
It is read and tokenized by `prepare.read_piece`, the function every prepare worker runs, in a
fresh process; the figures are that process's peak resident memory during the call above what it
had before (VmHWM, reset first, less VmRSS; Linux) and the seconds the call took. "one call" sets `tokenizer.SEGMENT_CHARS` above the
document's length, which is what prepare did before documents were cut into segments. The two run
alternately; medians of `--repeats`. Results are appended to BENCHMARKS.md.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, median, record

MEASURE = """
import json, sys, time
from pathlib import Path
from lm_pretrain.tokenizer import encoding as tokenizer
from lm_pretrain.data.prepare import Settings, read_piece
from lm_pretrain.data.readers import Input
def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
if sys.argv[3] == "one call":
    tokenizer.SEGMENT_CHARS = 1 << 40
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the memory in use now
before = kib("VmRSS:")
started = time.perf_counter()
piece = read_piece((0, Input(Path(sys.argv[1])), sys.argv[2], Settings()))
print(json.dumps({"seconds": time.perf_counter() - started, "mib": (kib("VmHWM:") - before) / 1024,
                  "tokens": int(piece.tokens.sum())}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    rows = ["| document | path | peak MiB above start | seconds | tokens |", "|---|---|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as scratch:
        for mb in args.mb:
            for shape, text in (("no spaces", "a" * (mb * 10**6)), ("words", "abcd " * (mb * 10**6 // 5))):
                path = Path(scratch) / "doc.jsonl"
                path.write_text(json.dumps({"text": text}) + "\n")
                runs = {"segments": [], "one call": []}
                for _ in range(args.repeats):
                    for how in runs:
                        done = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(Path(scratch) / "t"), how],
                                              capture_output=True, text=True, cwd=ROOT, check=True)
                        runs[how].append(json.loads(done.stdout))
                for how, results in runs.items():
                    rows.append(f"| {mb} MB, {shape} | {how} | {median([r['mib'] for r in results]):,.0f} | "
                                f"{median([r['seconds'] for r in results]):.1f} | {results[0]['tokens']:,} |")
                print(rows[-2], rows[-1], sep="\n", flush=True)
    print(record("Tokenizing one long document", f"python bench/long_document.py --mb {' '.join(map(str, args.mb))} "
                 f"--repeats {args.repeats}", rows,
                 "Segments: at most 65,536 characters per tokenizer call, cut before a space between two other "
                 "characters (the same tokens as the whole: tests/test_tokenizer.py), else at that length."))


if __name__ == "__main__":
    main()
