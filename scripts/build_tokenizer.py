"""Build CLIP's real BPE tokenizer files offline, from the vocabulary that the open-clip-torch wheel ships.

The file `open_clip/bpe_simple_vocab_16e6.txt.gz` is OpenAI's CLIP vocabulary, distributed under the MIT licence
by open-clip-torch (licence text copied next to the output as LICENSE-open_clip). The conversion follows OpenAI's
`simple_tokenizer.py`, so ids equal CLIP's: "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407].

Usage: python scripts/build_tokenizer.py OUT_DIR [--wheel open_clip_torch-3.3.0-py3-none-any.whl]
Without --wheel it runs `pip download --no-deps open-clip-torch==3.3.0` into a temp folder.
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OPEN_CLIP_MIT = """MIT License (open_clip, https://github.com/mlfoundations/open_clip), which ships OpenAI CLIP's
BPE vocabulary bpe_simple_vocab_16e6.txt.gz.

Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman, Nicholas Carlini, Rohan Taori, Achal Dave,
Vaishaal Shankar, John Miller, Hongseok Namkoong, Hannaneh Hajishirzi, Ali Farhadi, Ludwig Schmidt

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and
to permit persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions
of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO
THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS
IN THE SOFTWARE.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (as in CLIP's simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build(gz_bytes: bytes, out: Path) -> None:
    merges = gzip.decompress(gz_bytes).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True}, indent=1), "utf-8")
    (out / "LICENSE-open_clip").write_text(OPEN_CLIP_MIT, "utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--wheel", type=Path)
    a = ap.parse_args()
    wheel = a.wheel
    if wheel is None:
        tmp = Path(tempfile.mkdtemp())
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp),
                        "open-clip-torch==3.3.0"], check=True)
        wheel = next(tmp.glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        build(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz"), a.out)
    print(f"tokenizer written to {a.out}")


if __name__ == "__main__":
    main()
