"""A small byte-level BPE tokenizer in CLIP's format, trained offline by the project.

Real CLIP tokenizers cannot be downloaded here; tiny models need one that `CLIPTokenizer.from_pretrained`
loads through the same code path. We learn BPE merges over CLIP's pre-tokenization (lower-cased words,
bytes mapped to printable symbols, `</w>` on each word's last symbol), then write `vocab.json` in CLIP's
order (256 byte symbols, the same with `</w>`, one entry per merge, then the two special tokens) and
`merges.txt`. The trainer is a plain, deterministic loop (ties broken by the pair's text): the `tokenizers`
trainer breaks ties by hash order, which made two builds of the "same" preset differ.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import regex

# CLIP's pre-tokenizer pattern (openai/CLIP simple_tokenizer.py).
CLIP_PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                             r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")

# Words our prompts use, so that common words are single tokens, as in the real CLIP vocabulary.
CORPUS = """
a photo of the an in on with and at by for from to is it this that its
sks rare teapot dog cat backpack can sneaker toy robot bowl candle clock boot glasses cartoon vase plushie
stuffed animal person man woman child car bear duck monster sloth wolf berry poop emoji
jungle snow beach cobblestone street pink fabric top wooden floor city background mountain blue house purple
rug forest wheat field tree autumn leaves eiffel tower floating water ocean milk green grass sunflowers around
mirror sidewalk crowded dirt road white red shiny wet cube shaped wearing hat santa rainbow scarf black monocle
chef outfit firefighter police yellow shirt wizard painting drawing sketch render illustration watercolor oil
digital art style cinematic lighting studio sunset night day indoor outdoor close up wide shot high quality
detailed realistic colorful orange gray grey brown gold silver bright dark soft light shadow table kitchen
room window garden park desert lake river sky clouds space under next behind front side view portrait
"""


def train_clip_bpe(out_dir: Path, vocab_size: int = 1000, extra_text: str = "") -> Path:
    """Learn merges until the vocabulary has `vocab_size` entries; save in CLIP's format; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    byte_map = _bytes_to_unicode()
    words = Counter()
    for word in CLIP_PATTERN.findall(" ".join((CORPUS + " " + extra_text).lower().split())):
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        words[tuple(symbols[:-1] + [symbols[-1] + "</w>"])] += 1
    merges: list[tuple[str, str]] = []
    budget = vocab_size - 2 * 256 - 2
    while len(merges) < budget:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = Counter({_merge(word, best): count for word, count in words.items()})
    byte_symbols = [byte_map[b] for b in sorted(byte_map)]
    vocab_list = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in vocab_list:
        vocab.setdefault(token, len(vocab))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out_dir


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
    bs += list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
