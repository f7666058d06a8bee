"""A small byte-level BPE tokenizer in CLIP's format, trained offline by the project.

Real CLIP tokenizers cannot be downloaded here; tiny models need one that `CLIPTokenizer.from_pretrained`
loads through the same code path. We train a BPE with CLIP's normalizer and pre-tokenizer and an
end-of-word suffix `</w>`, then write `vocab.json` in CLIP's order (256 byte symbols, the same with
`</w>`, one entry per merge, then the two special tokens) and `merges.txt`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel

# CLIP's pre-tokenizer pattern (openai/CLIP simple_tokenizer.py).
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

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
    """Train the tokenizer and save it in CLIP's slow-tokenizer format; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        end_of_word_suffix="</w>",
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = (CORPUS + "\n" + extra_text).split("\n") * 4
    tok.train_from_iterator(lines, trainer=trainer)

    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    byte_symbols = sorted(ByteLevel.alphabet(), key=_byte_order)
    vocab_list = byte_symbols + [s + "</w>" for s in byte_symbols] + [m.replace(" ", "") for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in vocab_list:
        vocab.setdefault(token, len(vocab))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out_dir


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


def _byte_order(symbol: str) -> int:
    """Order byte symbols by the byte they stand for, as CLIP's vocabulary does."""
    return _SYMBOL_TO_BYTE[symbol]


_SYMBOL_TO_BYTE = {v: k for k, v in _bytes_to_unicode().items()}
