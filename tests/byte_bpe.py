"""Byte-level BPE tokenizer files for the tiny test models: one token per byte (no merges), in GPT-2's reversible
byte -> printable character table, as RoBERTa / GPT-2 files on disk or as a Qwen2 tokenizer object."""
import json


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table, printable bytes first (their order is the vocabulary's)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return {b: out[b] for b in keep + [b for b in range(256) if b not in keep]}


def byte_vocab() -> dict:
    """{character: id} with one id per byte, "!" first, as in GPT-2."""
    return {c: i for i, c in enumerate(bytes_to_unicode().values())}


def write_bpe_tokenizer(dst, kind: str) -> int:
    """vocab.json + merges.txt (no merges: one token per byte) in the RoBERTa or GPT-2 layout; returns the size."""
    chars = list(bytes_to_unicode().values())
    if kind == "roberta":
        vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + chars)}
        cfg = {"tokenizer_class": "RobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
               "unk_token": "<unk>", "cls_token": "<s>", "sep_token": "</s>", "model_max_length": 512}
    else:
        vocab = {t: i for i, t in enumerate(chars + ["<|endoftext|>"])}      # "!" is id 0, as in GPT-2
        cfg = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "model_max_length": 1024}
    (dst / "vocab.json").write_text(json.dumps(vocab))
    (dst / "merges.txt").write_text("#version: 0.2\n")
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return len(vocab)
