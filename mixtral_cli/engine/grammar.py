"""Constrained decoding: a grammar the output must match, and the mask it puts on each step's logits.

The grammar engine is llguidance (chosen by measurement: docs/benchmarks.md, "Grammar engines").
A `Grammar` is compiled from JSON Schema (`json_schema`, `json_object`), from llguidance's Lark
syntax (`lark`), from llama.cpp's GBNF (`gbnf`) or by the tool-call code (`tool_calls.py`), and
checked once against the vocabulary (`check`), where a bad or too costly grammar is refused with
a `GrammarError`. A `Constraint` follows one generation: `allowed()` is the mask of the next token,
`advance(token)` feeds it the sampled one, `done` says that nothing but the end can follow.

Where the mask is computed: `Completion` asks for it after the next forward pass has been queued
and before the logits are read, so on a GPU it is computed while the GPU works; on the CPU it
costs what docs/benchmarks.md records (well under 1 ms per token on 32000 and 32768 entries).

JSON documents are generated compactly, `{"a": 1, "b": [2, 3]}` (one space after `:` and `,`, no
other whitespace outside strings), so a model cannot pad a document with whitespace forever; one
optional leading space is allowed because a SentencePiece answer starts with a space piece.
"""

from __future__ import annotations

import json
import re
import weakref
from typing import Any

import llguidance
import torch
from llguidance.gbnf_to_lark import gbnf_to_lark

from ..checkpoints.tokenizer import Tokenizer
from ..errors import UserError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_BYTES = 256 * 1024  # a larger schema is refused before compiling
MAX_SCHEMA_DEPTH = 64  # nesting of objects and arrays in the schema document
# llguidance's own resource limits, tightened so a hostile grammar fails in well under a second.
LIMITS = dict(initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, step_max_items=50_000,
              max_lexer_states=100_000, max_grammar_size=200_000)


class GrammarError(UserError):
    """A grammar or schema that cannot be used: invalid, outside what the engine supports, or too
    large or costly. `source` names it (a request field, a file), `problem` says what is wrong."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source, self.problem = source, problem


# -- the vocabulary as the engine sees it ------------------------------------------------------------
def token_bytes(tok: Tokenizer) -> list[bytes]:
    """Each id's bytes as it appears in text: '▁' as a space, a byte-fallback piece as its byte;
    control pieces as b"\\xff" + name (llguidance's mark of a special token)."""
    return _cached(tok)[0]


def raw_encode(tok: Tokenizer, text: str) -> list[int]:
    """`text` as SentencePiece encodes it in the middle of text: without the dummy-prefix space.
    Encoding after a newline does that (a newline is a byte-fallback piece in Mistral's vocabularies,
    so no piece joins it to the text), and the newline's own ids are dropped."""
    anchor = tok.encode("\n")
    ids = tok.encode("\n" + text)
    if ids[:len(anchor)] != anchor:
        raise RuntimeError("the tokenizer does not encode a leading newline as expected")
    return ids[len(anchor):]


class _EngineTokenizer:
    """What llguidance.TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tok: Tokenizer, pieces: list[bytes]) -> None:
        self.tok, self.tokens = tok, pieces
        self.eos_token_id, self.bos_token_id = tok.eos_id, tok.bos_id
        self.special_token_ids = [i for i, p in enumerate(pieces) if p.startswith(b"\xff")]

    def __call__(self, text: bytes) -> list[int]:
        return raw_encode(self.tok, text.decode("utf-8", errors="replace"))


_TABLES: weakref.WeakKeyDictionary[Tokenizer, tuple[list[bytes], llguidance.LLTokenizer]] = \
    weakref.WeakKeyDictionary()


def _cached(tok: Tokenizer) -> tuple[list[bytes], llguidance.LLTokenizer]:
    """The byte table and the engine's tokenizer, built once per tokenizer (about 0.5 s)."""
    if tok not in _TABLES:
        pieces = []
        for i in range(tok.vocab_size):
            piece = tok.id_to_piece(i)
            if tok.is_byte(i):
                pieces.append(bytes([int(piece[3:-1], 16)]))
            elif tok.is_control(i) or piece == "<unk>":
                pieces.append(b"\xff" + piece.encode())
            else:
                pieces.append(piece.replace("\u2581", " ").encode())
        _TABLES[tok] = pieces, llguidance.LLTokenizer(llguidance.TokenizerWrapper(_EngineTokenizer(tok, pieces)))
    return _TABLES[tok]


# -- grammars ----------------------------------------------------------------------------------------
def _depth(node: Any, limit: int) -> int:
    """Nesting depth of a JSON document, counted up to `limit` + 1."""
    depth, level = 0, [node]
    while level and depth <= limit:
        depth += 1
        level = [c for n in level for c in (n.values() if isinstance(n, dict) else n if isinstance(n, list) else ())
                 if isinstance(c, (dict, list))]
    return depth


class Grammar:
    """A compiled-to-text grammar in llguidance's format, with where it came from (`source`, for
    messages) and, for a JSON document, its `schema`. Build one with the class methods; `check` it
    before generating with it."""

    def __init__(self, text: str, source: str, schema: dict | None = None) -> None:
        self.text, self.source, self.schema = text, source, schema

    @classmethod
    def lark(cls, text: str, source: str = "grammar") -> Grammar:
        """llguidance's Lark dialect (it embeds JSON Schema as `%json {...}`)."""
        return cls(llguidance.LLMatcher.grammar_from_lark(text), source)

    @classmethod
    def gbnf(cls, text: str, source: str = "grammar") -> Grammar:
        """llama.cpp's GBNF, converted to Lark by llguidance."""
        try:
            lark = gbnf_to_lark(text)
        except Exception as e:  # the converter raises plain exceptions with a position
            raise GrammarError(source, f"not a valid GBNF grammar: {_one_line(e)}") from None
        return cls.lark(lark, source)

    @classmethod
    def json_schema(cls, schema: Any, source: str = "schema") -> Grammar:
        """A JSON document valid under `schema` (llguidance's JSON Schema subset: types, properties,
        required, additionalProperties, enum, const, items/prefixItems with min/maxItems, string
        min/maxLength, pattern and format, number bounds, anyOf/oneOf/allOf, $ref/$defs)."""
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise GrammarError(source, f"a JSON Schema must be an object, got {type(schema).__name__}")
        size = len(json.dumps(schema))
        if size > MAX_SCHEMA_BYTES:
            raise GrammarError(source, f"the schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are accepted")
        if _depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
            raise GrammarError(source, f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        return cls(llguidance.LLMatcher.grammar_from_lark(json_rule(schema)), source, schema)

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's `{"type": "json_object"}`)."""
        return cls.json_schema({"type": "object"}, "response_format")

    def validate(self, tok: Tokenizer | None = None) -> None:
        """Raise GrammarError if the engine refuses the grammar: from its text alone, or (with
        `tok`) against that vocabulary; bounded by `LIMITS`."""
        error = llguidance.LLMatcher.validate_grammar(self.text, _cached(tok)[1] if tok else None, limits=_limits())
        if error:
            raise GrammarError(self.source, _one_line(error))

    def check(self, tok: Tokenizer) -> None:
        """Compile against `tok`'s vocabulary; raise GrammarError if the engine refuses the grammar."""
        self.validate(tok)
        matcher = llguidance.LLMatcher(_cached(tok)[1], self.text, log_level=0, limits=_limits())
        if matcher.is_error():
            raise GrammarError(self.source, _one_line(matcher.get_error()))


def json_body(schema: dict) -> str:
    """A Lark expression for a document valid under `schema`, in the compact layout (`JSON_OPTIONS`)."""
    body = dict(schema)
    body["x-guidance"] = {**JSON_OPTIONS, **body.get("x-guidance", {})}
    return f"%json {json.dumps(body, ensure_ascii=False)}"


def json_rule(schema: dict) -> str:
    """The Lark grammar of a `schema` document after one optional space."""
    return f'start: " "? {json_body(schema)}'


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**LIMITS)


def _one_line(error: object) -> str:
    """An engine message cut to its first line (the rest is a parser dump), without its position
    in the generated grammar text (which the user never wrote)."""
    text = str(error).strip().splitlines()
    line = text[0] if text else "invalid grammar"
    line = re.sub(r"^at \d+\(\d+\): ", "", line.removeprefix("Parser Error: ").removeprefix("Error: "))
    return line.removeprefix("failed to compile JSON schema: ")


# -- one generation ----------------------------------------------------------------------------------
class Constraint:
    """The state of `grammar` over one generation's tokens."""

    def __init__(self, grammar: Grammar, tok: Tokenizer) -> None:
        self.grammar, self.tok = grammar, tok
        self._matcher = llguidance.LLMatcher(_cached(tok)[1], grammar.text, log_level=0, limits=_limits())
        if self._matcher.is_error():
            raise GrammarError(grammar.source, _one_line(self._matcher.get_error()))
        self._vocab = tok.vocab_size

    def allowed(self) -> torch.Tensor:
        """Bool [V]: the tokens that keep the output inside the grammar (EOS once it may end)."""
        bias = self._matcher.compute_logit_bias()  # one byte per token: 0 or 200
        self._raise_if_failed()
        return torch.frombuffer(bytearray(bias), dtype=torch.uint8)[:self._vocab].bool()

    def advance(self, token: int) -> None:
        """Feed the sampled token (one `allowed()` said was allowed)."""
        self._matcher.consume_token(token)
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        """A grammar that passed `check` can still exceed the engine's per-step limits on some
        output (a lexer state explosion): a GrammarError, never a wrong mask."""
        if self._matcher.is_error():
            raise GrammarError(self.grammar.source, f"stopped mid-output: {_one_line(self._matcher.get_error())}")

    @property
    def done(self) -> bool:
        """Nothing but the end of the output may follow."""
        return self._matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """The output so far is a whole sentence of the grammar."""
        return self._matcher.is_accepting()

