#!/usr/bin/env python3
"""Generate tests/tokenizer/data/components.json: small tokenizer.json files
for the components the fixtures do not use, with the ids and decodes that
the Hugging Face `tokenizers` library computes for a few texts each.

Run once by hand (the tests only read the JSON it writes; they never need
Python):
    python3 -m venv /tmp/tokvenv && /tmp/tokvenv/bin/pip install tokenizers
    /tmp/tokvenv/bin/python tests/tokenizer/gen_components.py
The library version used is recorded in the output ("tokenizers_version").
"""
import json
import os

import tokenizers
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

CORPUS = [
    "Hello world, hello there! The quick brown fox jumps over the lazy dog.",
    "numbers 12345 and 3.14159, café déjà vu, naïve façade",
    "snake_case_name camelCaseName   spaces\ttabs\nnewlines",
    "mixed 中文 and English 混排 text; ＦＵＬＬ width ① ﬁ",
    "It's we're they've I'm you'll he'd DON'T",
] * 20

TEXTS = [
    "Hello world",
    "  Hello,   world!  ",
    "hello there 12345 3.14",
    "café déjà vu ＦＵＬＬ ① ﬁ",
    "snake_case_name camelCaseName",
    "It's DON'T he'd",
    "mixed 中文 and English",
    "tabs\tand\nnewlines",
    "unknown: ZQXJ @#$ 🚀",
    "",
    " ",
]


def trained(model_kwargs, normalizer=None, pre=None, decoder=None, post=None, specials=(),
            trainer_kwargs=None):
    tok = Tokenizer(BPE(**model_kwargs))
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre is not None:
        tok.pre_tokenizer = pre
    trainer = BpeTrainer(vocab_size=300, special_tokens=list(specials), show_progress=False,
                         **(trainer_kwargs or {}))
    tok.train_from_iterator(CORPUS, trainer)
    if decoder is not None:
        tok.decoder = decoder
    if post is not None:
        tok.post_processor = post
    return tok


def cases_for(tok, texts, add_special=True):
    out = []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=add_special).ids
        out.append({"text": t, "ids": ids,
                    "decoded": tok.decode(ids, skip_special_tokens=False),
                    "decoded_skip": tok.decode(ids, skip_special_tokens=True)})
    return out


def entry(name, tok, texts=TEXTS, add_special=True):
    return {"name": name, "add_special_tokens": add_special,
            "tokenizer": json.loads(tok.to_str()), "cases": cases_for(tok, texts, add_special)}


def main():
    ws = pre_tokenizers.Whitespace()
    unk = {"unk_token": "[UNK]"}
    out = []

    # Metaspace, three prepend schemes, with and without split; SentencePiece decoders
    for scheme in ("always", "first", "never"):
        for split in (True, False):
            tok = trained(unk, pre=pre_tokenizers.Metaspace(prepend_scheme=scheme, split=split),
                          decoder=decoders.Metaspace(prepend_scheme=scheme, split=split),
                          specials=["[UNK]", "<sep>"])
            texts = TEXTS + ["a<sep>b c", "<sep> x", "  two"]
            out.append(entry(f"metaspace_{scheme}_{'split' if split else 'nosplit'}", tok, texts))

    # Digits, Whitespace, WhitespaceSplit, Punctuation, BertPreTokenizer
    for name, pre in [
        ("digits_individual", pre_tokenizers.Sequence([ws, pre_tokenizers.Digits(True)])),
        ("digits_contiguous", pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                      pre_tokenizers.Digits(False)])),
        ("whitespace", ws),
        ("punctuation_isolated", pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                         pre_tokenizers.Punctuation()])),
        ("punctuation_merged_prev", pre_tokenizers.Punctuation("merged_with_previous")),
        ("bert", pre_tokenizers.BertPreTokenizer()),
    ]:
        out.append(entry(name, trained(unk, pre=pre, specials=["[UNK]"])))

    # Split: every behaviour, regex and string patterns, invert
    for behavior in ("removed", "isolated", "merged_with_previous", "merged_with_next",
                     "contiguous"):
        for invert in (False, True):
            for kind, pattern in (("regex", tokenizers.Regex(r"\s+|[,.!]")), ("string", " ")):
                pre = pre_tokenizers.Split(pattern, behavior, invert=invert)
                out.append(entry(f"split_{behavior}_{kind}{'_invert' if invert else ''}",
                                 trained(unk, pre=pre, specials=["[UNK]"])))

    # Normalizers
    for name, norm in [
        ("nfkc_lowercase", normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])),
        ("nfd_strip_accents", normalizers.Sequence([normalizers.NFD(),
                                                    normalizers.StripAccents()])),
        ("strip_left_right", normalizers.Strip()),
        ("strip_right_only", normalizers.Strip(left=False, right=True)),
        ("replace_regex", normalizers.Sequence([normalizers.Replace(tokenizers.Regex(r"\d+"), "#"),
                                                normalizers.Replace("o", "0")])),
        ("nfkd", normalizers.NFKD()),
    ]:
        out.append(entry(name, trained(unk, normalizer=norm, pre=ws, specials=["[UNK]"])))

    # unk: fused and not fused; byte level off, no byte fallback
    for fuse in (True, False):
        tok = trained({"unk_token": "[UNK]", "fuse_unk": fuse}, pre=ws, specials=["[UNK]"])
        out.append(entry(f"unk_fuse_{str(fuse).lower()}", tok,
                         TEXTS + ["ZZZQQQ xx ZQ", "ZQ中Z文"]))

    # continuing_subword_prefix / end_of_word_suffix with the BPE decoder
    tok = trained({"unk_token": "[UNK]", "continuing_subword_prefix": "##"}, pre=ws,
                  specials=["[UNK]"], trainer_kwargs={"continuing_subword_prefix": "##"})
    out.append(entry("continuing_subword_prefix", tok))
    tok = trained({"unk_token": "[UNK]", "end_of_word_suffix": "</w>"}, pre=ws,
                  decoder=decoders.BPEDecoder(suffix="</w>"), specials=["[UNK]"],
                  trainer_kwargs={"end_of_word_suffix": "</w>"})
    out.append(entry("end_of_word_suffix", tok))

    # GPT-2 style byte level: own regex, add_prefix_space, BOS/EOS template, Sequence processor
    bl = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok = trained({}, pre=bl, decoder=decoders.ByteLevel(),
                  post=processors.Sequence([
                      processors.ByteLevel(trim_offsets=False),
                      processors.TemplateProcessing(single="<bos> $A <eos>",
                                                    special_tokens=[("<bos>", 0), ("<eos>", 1)])]),
                  specials=["<bos>", "<eos>"],
                  trainer_kwargs={"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()})
    out.append(entry("bytelevel_gpt2", tok))
    out.append(entry("bytelevel_gpt2_nospecial", tok, add_special=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([ws, pre_tokenizers.ByteLevel(
        add_prefix_space=True, use_regex=False)])
    out.append(entry("bytelevel_prefix_after_split", tok))

    # ignore_merges (Llama-3): a word in the vocab is one token whatever the merges say
    vocab = {c: i for i, c in enumerate("helowrd ")}
    vocab.update({"he": 8, "ll": 9, "llo": 10, "hello": 11, "wo": 12})
    merges = [("h", "e"), ("l", "l"), ("ll", "o"), ("w", "o")]
    for im in (True, False):
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=im))
        tok.pre_tokenizer = ws
        out.append(entry(f"ignore_merges_{str(im).lower()}", tok,
                         ["hello world", "hellohello", "hello"]))

    # Llama-3 style: Split with the Llama-3 regex, ByteLevel without regex, ignore_merges
    llama3_re = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(llama3_re), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = trained({"ignore_merges": True}, pre=pre, decoder=decoders.ByteLevel(),
                  post=processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                     special_tokens=[("<|begin_of_text|>", 0)]),
                  specials=["<|begin_of_text|>", "<|eot_id|>"],
                  trainer_kwargs={"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()})
    out.append(entry("llama3_style", tok, TEXTS + ["1234567 numbers", "<|eot_id|>x<|eot_id|>",
                                                   "HELLO'S WORLD'LL"]))

    # decoder Strip at both ends after Replace + Fuse
    tok = trained(unk, pre=pre_tokenizers.Metaspace(), specials=["[UNK]"],
                  decoder=decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                             decoders.Strip(" ", 2, 1)]))
    # (not "" or " ": the Rust Strip decoder panics when stripping empties a token)
    out.append(entry("decoder_strip_both", tok, [t for t in TEXTS if t.strip()]))

    # byte_fallback with the SentencePiece decoder chain
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for c in "▁abcdehlorw":
        vocab[c] = len(vocab)
    vocab.update({"▁h": len(vocab), "el": len(vocab) + 1, "lo": len(vocab) + 2})
    merges = [("▁", "h"), ("e", "l"), ("l", "o")]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                        fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    out.append(entry("byte_fallback", tok, ["hello world", "héllo 中 🚀", "", "x"]))

    # added tokens: lstrip, rstrip, single_word, normalized, special or not
    tok = trained(unk, normalizer=normalizers.Lowercase(), pre=ws, specials=["[UNK]"])
    tok.add_special_tokens([AddedToken("<L>", lstrip=True), AddedToken("<R>", rstrip=True)])
    tok.add_tokens([AddedToken("word", single_word=True),
                    AddedToken("HeLLo", normalized=True),
                    AddedToken("RAW", normalized=False),
                    AddedToken("<LR>", lstrip=True, rstrip=True, special=False)])
    out.append(entry("added_tokens", tok, [
        "a  <L>  b  <R>  c", "<L>x<R>", "words word sword word.", "hello HELLO HeLLo",
        "RAW raw", "x  <LR>  y", "<L><R><LR>", "wordword word"]))

    doc = {"tokenizers_version": tokenizers.__version__, "generated_by":
           "tests/tokenizer/gen_components.py", "tests": out}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "components.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {len(out)} tokenizers to {path}")


if __name__ == "__main__":
    main()
