"""CLIP's real BPE tokenizer files, built from the vocabulary that ships in the open-clip-torch wheel (MIT).

The default pipeline's tokenizer must be CLIP's own (49,408 tokens), so that any prompt, in or out of the toy
vocabulary, tokenizes exactly as for Stable Diffusion. The files are built once by the pretraining recipe and
shipped with the pipeline; this module is only needed to rebuild them.
"""

from __future__ import annotations

import gzip
import json
import tempfile
import importlib.util
from pathlib import Path

from ..errors import TuneQDMError

MERGES = 49152 - 256 - 2  # how many merges CLIP uses (its vocabulary: 256 bytes x 2 + merges + 2 specials)
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-character table, in CLIP's order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in printable] + [symbols[b] for b in range(256) if b not in printable]


def default_bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")  # located, not imported (open_clip imports torchvision)
    if spec is None or not spec.submodule_search_locations:
        raise TuneQDMError("CLIP's BPE vocabulary comes with open-clip-torch: pip install open-clip-torch --no-deps")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer(out_dir: Path, bpe_gz: Path | None = None) -> Path:
    """Write a ``CLIPTokenizer`` folder (vocab.json, merges.txt, configs) and return it."""
    from transformers import CLIPTokenizer

    bpe_gz = Path(bpe_gz) if bpe_gz else default_bpe_file()
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIALS)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(out_dir, model_max_length=77)
    if len(tokenizer) != 49408:
        raise TuneQDMError(f"built a CLIP tokenizer of {len(tokenizer)} tokens instead of 49408: wrong BPE file?")
    with tempfile.TemporaryDirectory() as tmp:  # keep the small config, not the 3.6 MB tokenizer.json
        tokenizer.save_pretrained(tmp)
        (out_dir / "tokenizer_config.json").write_bytes(Path(tmp, "tokenizer_config.json").read_bytes())
    return out_dir
