"""Tokenizer, chat template and streaming detokenizer against the real v1 and v3 tokenizers.

mistral-common (a test dependency) is the reference encoder for the chat template.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mixtral_cli.checkpoints.tokenizer import StreamDecoder, Tokenizer
from mixtral_cli.errors import UserError

INST = [733, 16289, 28793]  # " [INST]"
END_INST = [733, 28748, 16289, 28793]  # " [/INST]"
V3_CONTROL = {"[INST]": 3, "[/INST]": 4, "[TOOL_CALLS]": 5, "[AVAILABLE_TOOLS]": 6, "[/AVAILABLE_TOOLS]": 7,
              "[TOOL_RESULTS]": 8, "[/TOOL_RESULTS]": 9}

UNICODE_TEXTS = [
    "Hello, world!",
    "Café crème, naïve façade; Über, Größe, düster.",
    "日本語のテキストです。中文也可以。",
    "Emoji: 🙂👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 keycap 1️⃣ done",
    "line one\nline two\n\n  indented\ttab\r\nend",
    "  leading spaces and trailing  ",
    "mixed: é日🙂\n👍🏽ü\n",
    "ⅷ ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ € \u00a0nbsp",
]


@pytest.fixture(scope="module")
def tok(v1_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer.from_file(v1_tokenizer_path)


@pytest.fixture(scope="module")
def mistral_v1():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v1()


@pytest.fixture(scope="module")
def tok3(v3_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer.from_file(v3_tokenizer_path)


@pytest.fixture(scope="module")
def mistral_v3():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v3()


@pytest.fixture(params=["v1", "v3"])
def versioned(request, tok, tok3, mistral_v1, mistral_v3) -> tuple[Tokenizer, object]:
    """Each tokenizer version with its mistral-common reference encoder."""
    return (tok, mistral_v1) if request.param == "v1" else (tok3, mistral_v3)


@pytest.fixture
def any_tok(versioned) -> Tokenizer:
    return versioned[0]


def _reference_chat(mistral_v1, messages: list[dict], system: str | None = None) -> list[int]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    msgs = [SystemMessage(content=system)] if system else []
    for m in messages:
        cls = UserMessage if m["role"] == "user" else AssistantMessage
        msgs.append(cls(content=m["content"]))
    return mistral_v1.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens


def _reference_instruct(mistral, messages: list[dict], system: str | None = None) -> list[int]:
    """mistral-common's encoding of an already normalized conversation (user runs stay apart)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import InstructRequest

    msgs = [(UserMessage if m["role"] == "user" else AssistantMessage)(content=m["content"]) for m in messages]
    return mistral.instruct_tokenizer.encode_instruct(InstructRequest(messages=msgs, system_prompt=system)).tokens


def _byte_ids(tok: Tokenizer, text: str) -> list[int]:
    """Spell ``text`` with byte-fallback pieces only (as a model may generate it)."""
    return [tok._sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]


def _stream(tok: Tokenizer, ids: list[int], prompt_ids: list[int] | None = None) -> list[str]:
    dec = StreamDecoder(tok, prompt_ids)
    chunks = [dec.push(i) for i in ids]
    chunks.append(dec.flush())
    return chunks


# ----------------------------------------------------------------------------- loading


def test_loads_real_v1_tokenizer(tok: Tokenizer) -> None:
    assert tok.vocab_size == 32000
    assert tok.bos_id == 1
    assert tok.eos_id == 2


def test_missing_file_is_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(UserError) as info:
        Tokenizer.from_file(missing)
    assert str(missing) in info.value.message


def test_directory_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        Tokenizer.from_file(tmp_path)
    assert str(tmp_path) in info.value.message


@pytest.mark.parametrize("content", [b"", b"this is not a sentencepiece model", bytes(range(256)) * 40])
def test_corrupt_file_is_user_error(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    with pytest.raises(UserError) as info:
        Tokenizer.from_file(bad)
    assert str(bad) in info.value.message


def test_truncated_real_file_is_user_error(tmp_path: Path, v1_tokenizer_path: Path) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(v1_tokenizer_path.read_bytes()[:1000])
    with pytest.raises(UserError) as info:
        Tokenizer.from_file(bad)
    assert str(bad) in info.value.message


# ----------------------------------------------------------------------------- versions


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v3"])
def test_version_is_read_from_the_file_not_its_name(
    tmp_path: Path, v1_tokenizer_path: Path, v3_tokenizer_path: Path, name: str
) -> None:
    for source, version, vocab_size in ((v1_tokenizer_path, "v1", 32000), (v3_tokenizer_path, "v3", 32768)):
        copy = tmp_path / version / name
        copy.parent.mkdir()
        copy.write_bytes(source.read_bytes())
        tok = Tokenizer.from_file(copy)
        assert (tok.version, tok.vocab_size) == (version, vocab_size)


def test_v3_control_pieces_are_single_ids(tok3: Tokenizer, tok: Tokenizer) -> None:
    assert {p: tok3._sp.piece_to_id(p) for p in V3_CONTROL} == V3_CONTROL
    assert all(tok3.is_control(i) for i in V3_CONTROL.values())
    assert not any(tok.is_control(tok._sp.piece_to_id(p)) for p in V3_CONTROL)  # v1: text, or unknown


def test_newer_tokenizer_version_is_user_error(tmp_path: Path, v3_tokenizer_path: Path) -> None:
    newer = tmp_path / "tokenizer.model"  # v7: the system prompt in [SYSTEM_PROMPT] blocks
    newer.write_bytes((v3_tokenizer_path.parent / "mistral_instruct_tokenizer_241114.model.v7").read_bytes())
    with pytest.raises(UserError) as info:
        Tokenizer.from_file(newer)
    assert str(newer) in info.value.message and "v3" in info.value.message


# ----------------------------------------------------------------------------- encode/decode


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_encode_decode_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(text, bos=True) == [tok.bos_id, *ids]
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == tok.decode(ids)


def test_round_trip_keeps_leading_spaces_except_the_dummy_prefix(tok: Tokenizer) -> None:
    # SentencePiece adds one dummy-prefix space on encode and removes one on decode.
    assert tok.decode(tok.encode("  two")) == "  two"
    assert tok.decode(tok.encode(" one")) == " one"


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_encode_matches_mistral_common(tok: Tokenizer, mistral_v1, text: str) -> None:
    raw = mistral_v1.instruct_tokenizer.tokenizer
    assert tok.encode(text) == raw.encode(text, bos=False, eos=False)
    assert tok.encode(text, bos=True) == raw.encode(text, bos=True, eos=False)


def test_inst_marker_ids(tok: Tokenizer) -> None:
    assert tok.encode("[INST]") == INST
    assert [tok.id_to_piece(i) for i in INST] == ["\u2581[", "INST", "]"]
    assert tok.encode("[/INST]") == END_INST


# ----------------------------------------------------------------------------- chat template

ONE_TURN = [{"role": "user", "content": "What is the capital of France?"}]
THREE_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": "Why did the chicken cross the road?"},
    {"role": "user", "content": "Why?"},
]
UNICODE_TURNS = [
    {"role": "user", "content": "Écris « bonjour » en 日本語 🙂"},
    {"role": "assistant", "content": "こんにちは 👍🏽\nVoilà."},
    {"role": "user", "content": "  spaces  \n\nand lines  "},
]

CHAT_CASES = {
    "one-turn": (ONE_TURN, None),
    "three-turns": (THREE_TURNS, None),
    "system-one-turn": (ONE_TURN, "You are a helpful assistant."),
    "system-multi-turn": (THREE_TURNS, "Answer in one sentence.\nBe polite."),
    "unicode-multi-turn": (UNICODE_TURNS, "Réponds en français 🙂"),
    "empty-user": ([{"role": "user", "content": ""}], None),
}


@pytest.mark.parametrize("name", list(CHAT_CASES))
def test_encode_chat_matches_mistral_common_v1(tok: Tokenizer, mistral_v1, name: str) -> None:
    messages, system = CHAT_CASES[name]
    expected = _reference_chat(mistral_v1, messages, system)
    assert tok.encode_chat(messages, system=system) == expected


def test_one_turn_layout(tok: Tokenizer) -> None:
    ids = tok.encode_chat(ONE_TURN)
    assert ids[: 1 + len(INST)] == [1, *INST]
    assert ids[-len(END_INST) :] == END_INST
    assert ids.count(tok.eos_id) == 0
    assert tok.decode(ids) == "[INST] What is the capital of France? [/INST]"


def test_multi_turn_layout(tok: Tokenizer) -> None:
    ids = tok.encode_chat(THREE_TURNS)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids.count(tok.eos_id) == 2  # one per assistant answer
    # every user turn starts with " [INST]", including the ones right after </s>
    starts = [i for i in range(len(ids)) if ids[i : i + 3] == INST]
    assert len(starts) == 3
    assert starts[0] == 1
    assert all(ids[s - 1] == tok.eos_id for s in starts[1:])
    # the answer follows " [/INST]" with its own leading space piece
    first_answer = ids.index(tok.eos_id)
    answer_ids = tok.encode("Hello! How can I help?")
    assert ids[first_answer - len(answer_ids) : first_answer] == answer_ids
    assert ids[first_answer - len(answer_ids) - len(END_INST) : first_answer - len(answer_ids)] == END_INST


def test_system_prompt_goes_before_first_user_message_only(tok: Tokenizer) -> None:
    ids = tok.encode_chat(THREE_TURNS, system="SYSTEM TEXT")
    text = tok.decode(ids)
    assert text.startswith("[INST] SYSTEM TEXT\n\nHi [/INST]")
    assert text.count("SYSTEM TEXT") == 1
    assert text.endswith("[INST] Why? [/INST]")
    # and not in front of the last user message
    assert ids[-len(tok.encode("[INST] Why? [/INST]")) :] == tok.encode("[INST] Why? [/INST]")


def test_empty_system_is_no_system(tok: Tokenizer) -> None:
    assert tok.encode_chat(THREE_TURNS, system="") == tok.encode_chat(THREE_TURNS)
    assert tok.encode_chat(THREE_TURNS, system=None) == tok.encode_chat(THREE_TURNS)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"},
        ],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}],
        [
            {"role": "user", "content": "a"},
            {"role": "tool", "content": "b"},
            {"role": "user", "content": "c"},
        ],
        [{"role": "user", "content": 3}],
        [{"content": "no role"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "c"},
        ],
    ],
)
def test_invalid_conversations_raise_value_error(any_tok: Tokenizer, messages: list[dict]) -> None:
    with pytest.raises(ValueError) as info:
        any_tok.encode_chat(messages)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError):
        any_tok.encode_instruct(messages)


# ----------------------------------------------------------------------------- v3, merged turns

EDGE_CASES = {
    "two-users": ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], None),
    "user-runs-with-system": (
        [
            {"role": "user", "content": "first"},
            {"role": "user", "content": "second"},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": ""},
            {"role": "user", "content": "  third "},
            {"role": "user", "content": ""},
        ],
        "Be brief.",
    ),
    "empty-users-with-system": ([{"role": "user", "content": ""}, {"role": "user", "content": ""}], "sys"),
    "whitespace": (
        [
            {"role": "user", "content": "  lead and trail  "},
            {"role": "assistant", "content": "trailing spaces   "},
            {"role": "user", "content": "\n\n"},
            {"role": "assistant", "content": "tab\t and newline \n "},
            {"role": "user", "content": " "},
        ],
        " spaced system \n",
    ),
    "spaces-only-answer": (
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "   "}, {"role": "user", "content": "b"}],
        None,
    ),
    "marker-text": ([{"role": "user", "content": "[INST] not a marker [/INST] [TOOL_CALLS] <s>"}], "[/INST]"),
    "long-unicode": (UNICODE_TURNS + THREE_TURNS[1:] + UNICODE_TURNS[1:], "Réponds 🙂\n\tdans la langue."),
}


@pytest.mark.parametrize("name", list(CHAT_CASES | EDGE_CASES))
def test_encode_chat_matches_mistral_common(versioned, name: str) -> None:
    tok, mistral = versioned
    messages, system = (CHAT_CASES | EDGE_CASES)[name]
    assert tok.encode_chat(messages, system=system) == _reference_chat(mistral, messages, system)


@pytest.mark.parametrize("name", ["two-users", "user-runs-with-system", "empty-users-with-system"])
def test_encode_instruct_keeps_user_runs_apart_like_mistral_common(versioned, name: str) -> None:
    tok, mistral = versioned
    messages, system = EDGE_CASES[name]
    ids = tok.encode_instruct(messages, system=system)
    assert ids == _reference_instruct(mistral, messages, system)
    assert ids != tok.encode_chat(messages, system=system)


def test_v3_layout(tok3: Tokenizer) -> None:
    inst, end = V3_CONTROL["[INST]"], V3_CONTROL["[/INST]"]
    assert tok3.encode_chat(ONE_TURN) == [1, inst, *tok3.encode(ONE_TURN[0]["content"]), end]
    assert tok3.encode_chat([{"role": "user", "content": ""}]) == [1, inst, end]
    ids = tok3.encode_chat(THREE_TURNS, system="SYSTEM TEXT")
    answer = tok3.encode("Hello! How can I help?")
    assert ids[: 4 + len(answer)] == [1, inst, *tok3.encode("Hi"), end, *answer][: 4 + len(answer)]
    # the system prompt goes before the last user message only
    last = len(ids) - 1 - ids[::-1].index(inst)
    assert ids[last:] == [inst, *tok3.encode("SYSTEM TEXT\n\nWhy?"), end]
    assert tok3.decode(ids).count("SYSTEM TEXT") == 1
    # no space piece next to a control token: "▁Hi" is one piece, and "]" follows the text at once
    space = tok3._sp.piece_to_id("\u2581")
    neighbours = [ids[i + d] for i, t in enumerate(ids) if t in (inst, end) for d in (-1, 1) if 0 <= i + d < len(ids)]
    assert space not in neighbours


def test_consecutive_user_messages_merge_into_one_block(any_tok: Tokenizer) -> None:
    merged = any_tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert merged == any_tok.encode_chat([{"role": "user", "content": "a\n\nb"}])
    skipped = [{"role": "user", "content": ""}, {"role": "user", "content": "b"}, {"role": "user", "content": ""}]
    assert any_tok.encode_chat(skipped) == any_tok.encode_chat([{"role": "user", "content": "b"}])


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_stream_prompt_encoding_equals_one_shot_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, bos=True)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids)
    assert not any("\ufffd" in c for c in chunks)


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_stream_generated_answer(tok: Tokenizer, text: str) -> None:
    prompt = tok.encode_chat([{"role": "user", "content": "Say something."}])
    answer = [*tok.encode(text), tok.eos_id]  # the answer's first piece carries "▁"
    # Without context: exactly decode(answer), the text mistral-common's decode gives for a reply.
    chunks = _stream(tok, answer)
    assert "".join(chunks) == tok.decode(answer)
    assert not any("\ufffd" in c for c in chunks)
    # As a continuation of the prompt: the prompt's text is not repeated, the space is kept.
    full = tok.decode(prompt + answer)
    head = tok.decode(prompt)
    assert full.startswith(head)
    chunks = _stream(tok, answer, prompt_ids=prompt)
    assert "".join(chunks) == full[len(head) :]
    assert not any("\ufffd" in c for c in chunks)


def test_leading_space_of_first_generated_piece(tok: Tokenizer) -> None:
    answer = tok.encode("Paris")
    assert tok.id_to_piece(answer[0]).startswith("\u2581")
    assert "".join(_stream(tok, answer)) == "Paris"
    prompt = tok.encode("The capital of France is", bos=True)
    assert "".join(_stream(tok, answer, prompt_ids=prompt)) == " Paris"
    # a prompt made of control tokens only is not text: the space is still dropped
    assert "".join(_stream(tok, answer, prompt_ids=[tok.bos_id])) == "Paris"
    # after an end-of-sequence inside the stream the space is kept, as decode() keeps it
    ids = [*tok.encode("Hi"), tok.eos_id, *answer]
    assert "".join(_stream(tok, ids)) == tok.decode(ids) == "Hi Paris"


@pytest.mark.parametrize("text", ["é", "ü", "日本語", "🙂", "👍🏽", "👨‍👩‍👧", "a€b\n☃"])
def test_stream_byte_fallback_held_until_complete(tok: Tokenizer, text: str) -> None:
    ids = _byte_ids(tok, text)
    assert all(tok.is_byte(i) for i in ids)
    for prompt in (None, tok.encode("x", bos=True)):
        chunks = _stream(tok, ids, prompt)
        assert "".join(chunks) == tok.decode([*(prompt or []), *ids])[len(tok.decode(prompt or [])) :]
        assert "".join(chunks) == text
        assert not any("\ufffd" in c for c in chunks)
        # each character comes out as soon as its last byte arrives
        emitted = [c for c in chunks if c]
        assert emitted == list(text)


def test_stream_mixed_pieces_and_bytes(tok: Tokenizer) -> None:
    ids = [*tok.encode("Voilà"), *_byte_ids(tok, " 🙂"), *tok.encode("ok"), *_byte_ids(tok, "日"), tok.eos_id]
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == "Voilà 🙂 ok日"
    assert not any("\ufffd" in c for c in chunks)


def test_flush_emits_unfinished_character_like_decode(tok: Tokenizer) -> None:
    ids = [*tok.encode("ok"), *_byte_ids(tok, "🙂")[:2]]
    dec = StreamDecoder(tok)
    pushed = "".join(dec.push(i) for i in ids)
    assert pushed == "ok"
    rest = dec.flush()
    assert pushed + rest == tok.decode(ids)
    assert "\ufffd" in rest
    assert dec.flush() == ""


def test_invalid_bytes_are_emitted_once_final(tok: Tokenizer) -> None:
    # a lead byte followed by a plain piece can never complete: decode() shows U+FFFD, so do we
    ids = [*_byte_ids(tok, "é")[:1], *tok.encode("x")]
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


def test_stream_random_ids_equal_decode(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    sample = "Héllo wörld 日本語 🙂👍🏽 👨‍👩‍👧 ç\n\n  x\t€ ☃ end"
    byte_ids = [i for i in range(tok.vocab_size) if tok.is_byte(i)]
    pool = sorted(set(tok.encode(sample))) + byte_ids + [0, tok.bos_id, tok.eos_id, 28705, 259]
    for _ in range(3000):
        ids = [
            rng.choice(pool) if rng.random() < 0.85 else rng.randrange(tok.vocab_size)
            for _ in range(rng.randint(0, 14))
        ]
        assert "".join(_stream(tok, ids)) == tok.decode(ids), ids
        prompt = tok.encode(rng.choice(["", "Hi", "日本", "🙂 x"]), bos=rng.random() < 0.5)
        full, head = tok.decode(prompt + ids), tok.decode(prompt)
        assert "".join(_stream(tok, ids, prompt)) == full[len(head) :], (prompt, ids)


class _DecodeSpy:
    """Wraps the SentencePiece processor and records the length of every decode call."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.lengths: list[int] = []

    def decode(self, ids):
        self.lengths.append(len(ids))
        return self._inner.decode(ids)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_streaming_work_per_token_is_bounded(v1_tokenizer_path: Path) -> None:
    tok = Tokenizer.from_file(v1_tokenizer_path)
    text = " ".join(UNICODE_TEXTS) * 20
    ids = [*tok.encode(text), *_byte_ids(tok, "🙂👍🏽日本語") * 50]
    assert len(ids) > 2000
    spy = _DecodeSpy(tok._sp)
    tok._sp = spy
    out = "".join(_stream(tok, ids))
    tok._sp = spy._inner
    assert out == tok.decode(ids)
    assert len(spy.lengths) <= 2 * len(ids)
    assert max(spy.lengths) <= 6  # never the whole sequence, only the not-yet-emitted ids


# ----------------------------------------------------------------------------- v3 control pieces

CONTROL_TEXT = (*V3_CONTROL, "<s>", "</s>", "[control_", "[IMG]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]")


def test_v3_decode_drops_every_control_piece(tok3: Tokenizer, mistral_v3) -> None:
    control = sorted(tok3._control)
    assert len(control) == 750
    assert tok3.decode(control) == "" == tok3.decode_continuation(control)
    assert "".join(_stream(tok3, control)) == ""
    ids = tok3.encode_chat(THREE_TURNS, system="Be brief.")
    text = tok3.decode(ids)
    assert text == mistral_v3.decode(ids)
    assert text.startswith("Hi Hello! How can I help?") and text.endswith("Be brief.\n\nWhy?")
    assert not any(piece in text for piece in CONTROL_TEXT)


def test_v3_stream_skips_control_ids(tok3: Tokenizer) -> None:
    prompt = tok3.encode_chat(ONE_TURN)
    reply = [*tok3.encode("Sure"), V3_CONTROL["[TOOL_CALLS]"], *tok3.encode("[1]"), V3_CONTROL["[INST]"],
             *_byte_ids(tok3, "🙂"), V3_CONTROL["[/INST]"], *tok3.encode("ok"), tok3.eos_id]
    for context in (None, prompt):
        dec = StreamDecoder(tok3, context)
        chunks = [dec.push(i) for i in reply]
        assert all(chunk == "" for chunk, i in zip(chunks, reply, strict=True) if tok3.is_control(i))
        chunks.append(dec.flush())
        text = "".join(chunks)
        assert text == tok3.decode([*(context or []), *reply])[len(tok3.decode(context or [])) :]
        assert not any(piece in text for piece in CONTROL_TEXT)
    assert tok3.decode(reply) == "Sure [1]🙂 ok"


def test_v3_stream_random_ids_with_control_ids_equal_decode(tok3: Tokenizer) -> None:
    rng = random.Random(4321)
    sample = "Héllo wörld 日本語 🙂👍🏽 ç\n\n  x\t€ end [brackets]"
    byte_ids = [i for i in range(tok3.vocab_size) if tok3.is_byte(i)]
    control = sorted(tok3._control)
    pool = sorted(set(tok3.encode(sample))) + byte_ids + control[:16] + control[-4:]
    for _ in range(1000):
        ids = [
            rng.choice(pool) if rng.random() < 0.85 else rng.randrange(tok3.vocab_size)
            for _ in range(rng.randint(0, 14))
        ]
        text = "".join(_stream(tok3, ids))
        assert text == tok3.decode(ids), ids
        prompt = tok3.encode_chat([{"role": "user", "content": rng.choice(["", "Hi", "日本", "🙂 x"])}])
        full, head = tok3.decode(prompt + ids), tok3.decode(prompt)
        assert "".join(_stream(tok3, ids, prompt)) == full[len(head) :], (prompt, ids)
        assert not any(piece in text for piece in V3_CONTROL)
