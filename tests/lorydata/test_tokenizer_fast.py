"""The tiktoken engine gives the ids `tokenizers` gives (bundled sample, adversarial strings,
every code point), and tokenizers it cannot reproduce fall back to `tokenizers`."""

import itertools
import json
import sys

import numpy as np
import pyarrow as pa
import pytest
import zstandard
from tokenizers import Tokenizer as HFTokenizer

from lorydata.errors import LoryDataError
from lorydata.tokenizer import Tokenizer, train_tokenizer

ADVERSARIAL = [
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\t\ttabs \t \t mixed",
    "line\nbreaks\r\nwindows\r\n\r\n\n\n  \n indented",
    "\n" * 50 + " " * 50 + "\t" * 10,
    "non-breaking\u00a0space, ideographic\u3000space, em\u2003space, next\u0085line, sep\u2028par\u2029",
    "I'm, you're, he's, they'll, we've, I'd, IT'S, 'tis, rock 'n' roll, ''s",
    "numbers 1 12 123 1234567890 3.14159 1,000,000 ٣٤٥ ४५६ ½ Ⅻ ²³",
    "İstanbul ΣΊΣΥΦΟΣ Straße ǅemal ﬁne café naïve e\u0301 a\u0308",
    "日本語のテキスト、中文文本。한국어 텍스트 ไทย العربية עברית देवनागरी",
    "emoji 😀🎉 zwj 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽 keycap 1️⃣ variation ☺️",
    "control \x00\x01\x02\x07\x08\x0b\x0c\x0e\x1b\x1f\x7f\x80\x9f chars",
    "a" * 10_000,  # one very long word
    "x" + "yz" * 3000 + " " + "9" * 5000 + " " + "!?" * 2000,
    "\U0001f600" * 500 + "\U000e0001\U0010fffd",
    "<|endoftext|>",
    "before<|endoftext|>after",
    "a document <|endoftext|> with the end token <|endoftext|><|endoftext|> inside",
    "<|endoftext|> at the start and the end <|endoftext|>",
    "pad <|pad|> and near misses <|endoftext| <endoftext|> <| endoftext |> <|ENDOFTEXT|>",
    "  <|endoftext|>  spaces around  <|pad|>\n",
]


def sample_texts(path) -> list[str]:
    with zstandard.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def reference(path, texts: list[str]) -> list[list[int]]:
    hf = HFTokenizer.from_file(str(path))
    return [hf.encode(text, add_special_tokens=False).ids for text in texts]


def assert_identical(tok: Tokenizer, texts: list[str], path) -> None:
    expected = reference(path, texts)
    assert tok.encode_batch(texts) == expected
    assert [tok.encode(text) for text in texts] == expected
    offsets, values = tok.encode_batch_numpy(texts, threads=1)
    assert offsets.dtype == np.int64 and values.dtype == np.int32
    assert [values[a:b].tolist() for a, b in itertools.pairwise(offsets)] == expected
    arrow = tok.encode_batch_arrow(texts, threads=2)
    assert arrow.type == pa.list_(pa.int32()) and arrow.to_pylist() == expected


@pytest.fixture(scope="module")
def tok(default_tokenizer_path) -> Tokenizer:
    return Tokenizer(default_tokenizer_path)


def test_bundled_tokenizer_runs_on_tiktoken(tok):
    assert tok.engine == "tiktoken" and tok.fallback_reason is None


def test_bundled_sample_is_token_identical(tok, sample_corpus, default_tokenizer_path):
    assert_identical(tok, sample_texts(sample_corpus)[::5], default_tokenizer_path)


@pytest.mark.slow
def test_whole_bundled_sample_is_token_identical(tok, sample_corpus, default_tokenizer_path):
    assert_identical(tok, sample_texts(sample_corpus), default_tokenizer_path)


def test_adversarial_strings_are_token_identical(tok, default_tokenizer_path):
    assert_identical(tok, ADVERSARIAL, default_tokenizer_path)


def test_special_token_text_in_a_document_becomes_its_id(tok):
    """As `tokenizers` does with add_special_tokens=False (kept: shards depend on it)."""
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eos_id in ids and len(ids) == 3


@pytest.mark.slow
def test_every_code_point_is_token_identical(tok, default_tokenizer_path):
    """The regex classes (\\s, \\p{L}, \\p{N}) of tiktoken's regex engine and of tokenizers'
    agree on every code point: all of them in a row, and each between letters and spaces."""
    code_points = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    texts = ["".join(map(chr, code_points[i : i + 16384])) for i in range(0, len(code_points), 16384)]
    texts += ["".join(f"a{chr(c)}b " for c in code_points[i : i + 4096]) for i in range(0, len(code_points), 65536)]
    spaces = [c for c in code_points if chr(c).isspace()] + [0x200B, 0x2060, 0xFEFF, 0x180E]
    texts += ["".join(f"x{chr(c)}{chr(c)} y{chr(c)}\n{chr(c)}" for c in spaces)]
    assert_identical(tok, texts, default_tokenizer_path)


def test_lone_surrogates_fail_as_tokenizers_does(tok):
    with pytest.raises(TypeError):
        tok.encode("a\ud800b")
    with pytest.raises(TypeError):
        tok.encode_batch(["fine", "a\udfffb"])


def test_engine_tokenizers_and_unknown_engine(default_tokenizer_path):
    tok = Tokenizer(default_tokenizer_path, engine="tokenizers")
    assert tok.engine == "tokenizers" and "requested" in tok.fallback_reason
    assert_identical(tok, ADVERSARIAL, default_tokenizer_path)
    with pytest.raises(LoryDataError, match="engine"):
        Tokenizer(default_tokenizer_path, engine="fast")


def test_without_tiktoken_installed_tokenizers_encodes(monkeypatch, default_tokenizer_path):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` raises ImportError
    tok = Tokenizer(default_tokenizer_path)
    assert tok.engine == "tokenizers" and "not installed" in tok.fallback_reason
    assert_identical(tok, ADVERSARIAL[:8], default_tokenizer_path)


def variant(tmp_path, default_tokenizer_path, change) -> str:
    spec = json.loads(default_tokenizer_path.read_text())
    change(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    return path


def add_merges(spec, merges):
    vocab = spec["model"]["vocab"]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
        spec["model"]["merges"].append([left, right])


@pytest.mark.parametrize("change, reason", [
    (lambda s: s.update(normalizer={"type": "Lowercase"}), "normalizer"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer"),
    (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "pre-tokenizer"),
    (lambda s: s["model"].update(ignore_merges=True), "ignore_merges"),
    (lambda s: s.update(post_processor={"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                                        "pair": [{"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {}}),
     "post-processor"),
    (lambda s: s["added_tokens"].append({**s["added_tokens"][0], "id": 8192, "content": "<|end"}), "prefix"),
    (lambda s: s["added_tokens"][0].update(lstrip=True), "lstrip"),
    (lambda s: add_merges(s, [("#$%", "&"), ("#", "$"), ("#$", "%")]), "before any merge makes it"),
])
def test_tokenizers_it_cannot_reproduce_fall_back(tmp_path, default_tokenizer_path, change, reason):
    path = variant(tmp_path, default_tokenizer_path, change)
    tok = Tokenizer(path)
    assert tok.engine == "tokenizers" and reason in tok.fallback_reason
    assert_identical(tok, [*ADVERSARIAL[:12], "#$%& a #$% b"], path)


def test_tokens_bpe_never_returns_whole_are_left_out(tmp_path, default_tokenizer_path):
    """Merges ($,%) then (#,$) then (#$,%): `tokenizers` turns "#$%" into [#, $%] (the pair
    (#, $%) is no merge), while a tiktoken that knew "#$%" would return it whole. The engine
    leaves such tokens out, so the ids still agree."""
    path = variant(tmp_path, default_tokenizer_path, lambda s: add_merges(s, [("$", "%"), ("#", "$"), ("#$", "%")]))
    tok = Tokenizer(path)
    assert tok.engine == "tiktoken"
    texts = ["#$%", "a #$% b #$%% ##$% #$#$%", "#$", "$%"]
    assert_identical(tok, texts, path)
    assert len(tok.encode("#$%")) == 2


def test_a_tokenizer_trained_here_runs_on_tiktoken_with_the_same_ids(tmp_path, sample_corpus):
    texts = sample_texts(sample_corpus)
    tok = train_tokenizer(texts[:60], tmp_path, vocab_size=700, seed=1)
    assert tok.engine == "tiktoken", tok.fallback_reason
    assert_identical(tok, texts[60:90] + ADVERSARIAL, tmp_path / "tokenizer.json")


def test_ids_out_of_merge_order_are_mapped_back(tmp_path, default_tokenizer_path):
    """A vocabulary whose ids do not follow the merges (here: reversed) still gives
    `tokenizers`' ids (tiktoken ranks are merge order; a table maps them back)."""
    def reverse_ids(spec):
        vocab = spec["model"]["vocab"]
        top = max(vocab.values())
        spec["model"]["vocab"] = {token: top - i for token, i in vocab.items()}
        for token in spec["added_tokens"]:
            token["id"] = top - token["id"]

    path = variant(tmp_path, default_tokenizer_path, reverse_ids)
    tok = Tokenizer(path)
    assert tok.engine == "tiktoken" and tok.eos_id == 8191
    assert_identical(tok, ADVERSARIAL, path)
