"""The digits teacher's tokenizer: a real CLIP byte-level BPE whose small vocabulary covers the caption words with
CLIP's own merges (so captions tokenize into exactly the pieces full CLIP gives them)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from transformers import CLIPTokenizer

CLIP_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "clip_tokenizer"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP's pre-tokenizer keeps runs of letters together and splits every digit on its own.
_CLIP_WORD_PATTERN = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def _bpe_merges_used(word: str, ranks: dict) -> list[tuple[str, str]]:
    """Run CLIP's BPE on one pre-tokenized word and return the merges it applies, in order."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    applied = []
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        applied.append(best)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return applied


def build_caption_tokenizer(words, save_dir, model_max_length: int = 77):
    """A real CLIP byte-level BPE tokenizer whose vocabulary covers ``words`` with CLIP's own merges.

    The vocabulary is CLIP's 256 byte symbols, the same 256 with the ``</w>`` end-of-word marker, one token
    per CLIP merge needed by ``words`` (kept in CLIP's rank order) and the two special tokens. Because BPE
    with a subset of merges that contains every merge a word uses reproduces that word's segmentation, the
    caption words tokenize into exactly the pieces full CLIP gives them. The files are written to
    ``save_dir`` and the loaded ``CLIPTokenizer`` is returned.
    """

    full_vocab = json.loads((CLIP_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    merge_lines = (CLIP_TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split()): rank for rank, line in enumerate(merge_lines) if line.strip()}

    used: set[tuple[str, str]] = set()
    for text in words:
        for piece in _CLIP_WORD_PATTERN.findall(str(text).lower()):
            used.update(_bpe_merges_used(piece, ranks))
    kept = sorted(used, key=ranks.__getitem__)

    by_id = sorted(full_vocab.items(), key=lambda item: item[1])
    vocab = {token: index for index, (token, _) in enumerate(by_id[:512])}  # bytes, then bytes + </w>
    for a, b in kept:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (save_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept), encoding="utf-8"
    )
    return CLIPTokenizer(
        str(save_dir / "vocab.json"),
        str(save_dir / "merges.txt"),
        model_max_length=model_max_length,
        pad_token=EOS_TOKEN,
    )
