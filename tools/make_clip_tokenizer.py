"""Write CLIP's byte-level BPE tokenizer files (vocab.json, merges.txt) from the BPE merges file
`bpe_simple_vocab_16e6.txt.gz` that OpenAI's CLIP release (and the open_clip_torch wheel) carries.

Run once; the output lives in lcm_kit/assets/clip_tokenizer so tests and the tiny kit never need a hub.
    python tools/make_clip_tokenizer.py path/to/bpe_simple_vocab_16e6.txt.gz lcm_kit/assets/clip_tokenizer
"""
import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode():
    # GPT-2/CLIP's reversible byte -> printable unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def main(bpe_path, out_dir):
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"wrote {len(vocab)} tokens, {len(merges)} merges to {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
