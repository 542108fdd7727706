"""Constrained output on the command line: `run --json-schema / --json-object / --grammar` and chat's
`/json`, read into a `Grammar`.

Reading (the option's value, its file) needs no torch and happens first; building the grammar
imports the grammar engine (and torch), so the commands call `build` after `_needs_torch`. A bad
schema or grammar is refused with one line naming the option (and the file) twice over: once from
its text alone (`build`, before a model is looked up or downloaded), and once against the model's
vocabulary as soon as its tokenizer is read (`check_with_tokenizer`, before the weights load).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from ..checkpoints.tokenizer import Tokenizer
    from ..engine.grammar import Grammar

SCHEMA_HINT = "pass inline JSON that starts with '{', or the path of a JSON file"


@dataclass(frozen=True)
class Spec:
    """What the output must match, as read from an option: a JSON Schema document (`schema`), any
    JSON object (`schema` {"type": "object"}), or a grammar file's text in GBNF or Lark (`grammar`).
    `source` names it in messages ("--json-schema", "--json-schema FILE", "--grammar FILE");
    `label` says what replies are, for chat."""

    source: str
    label: str
    schema: Any = None
    grammar: str | None = None
    lark: bool = False


def _read_text(path: Path, option: str) -> str:
    try:
        return path.expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{option}: no such file {path}", hint=SCHEMA_HINT if "schema" in option else None) from None
    except IsADirectoryError:
        raise UserError(f"{option}: {path} is a directory, not a file") from None
    except UnicodeDecodeError:
        raise UserError(f"{option}: {path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"{option}: cannot read {path} ({e.strerror or e})") from None


def schema_spec(value: str, option: str = "--json-schema") -> Spec:
    """A JSON Schema given inline (text starting with '{') or as the path of a JSON file."""
    if value.lstrip().startswith("{"):
        text, source, label = value, option, "JSON under the inline schema"
    else:
        if not value.strip():
            raise UserError(f"{option} needs a schema", hint=SCHEMA_HINT)
        text, source, label = _read_text(Path(value), option), f"{option} {value}", f"JSON under the schema in {value}"
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise UserError(f"{source}: a JSON Schema must be an object, got {type(schema).__name__}")
    return Spec(source, label, schema=schema)


def object_spec(option: str = "--json-object") -> Spec:
    """Any JSON object (OpenAI's `response_format` json_object)."""
    return Spec(option, "any JSON object", schema={"type": "object"})


def grammar_spec(path: str, option: str = "--grammar") -> Spec:
    """A grammar file: llguidance's Lark (a `start:` rule or `%llguidance`), else llama.cpp's GBNF."""
    from llguidance.gbnf_to_lark import is_lark_syntax  # pure Python, no torch

    source = f"{option} {path}"
    text = _read_text(Path(path), option)
    if not text.strip():
        raise UserError(f"{source}: the file is empty", hint="write a GBNF grammar (root ::= ...) or a Lark one (start: ...)")
    lark = is_lark_syntax(text)
    return Spec(source, f"text in the grammar of {path}", grammar=text, lark=lark)


def from_options(json_schema: str | None, json_object: bool, grammar: str | None) -> Spec | None:
    """The one constraint `run`'s options ask for (None: free text); two at once is a user error."""
    given = [name for name, v in (("--json-schema", json_schema), ("--json-object", json_object or None),
                                  ("--grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} cannot be combined", hint="pass one of them")
    if json_schema is not None:
        return schema_spec(json_schema)
    if json_object:
        return object_spec()
    if grammar is not None:
        return grammar_spec(grammar)
    return None


def build(spec: Spec) -> Grammar:
    """The grammar `spec` asks for, checked as far as its text alone allows (GrammarError if not)."""
    from ..engine.grammar import Grammar

    if spec.grammar is None:
        grammar = Grammar.json_schema(spec.schema, spec.source)
    elif spec.lark:
        grammar = Grammar.lark(spec.grammar, spec.source)  # a bad one is refused below
    else:
        grammar = Grammar.gbnf(spec.grammar, spec.source)
    grammar.validate()
    return grammar


def check_with_tokenizer(grammar: Grammar, model_dir: Path) -> Tokenizer | None:
    """The model's tokenizer with `grammar` checked against its vocabulary (GrammarError if the
    engine refuses it), read before any weight; None where the directory has no tokenizer.model
    (the loader says so in its own words)."""
    from ..checkpoints.tokenizer import Tokenizer

    path = Path(model_dir) / "tokenizer.model"
    if not path.is_file():
        return None
    tok = Tokenizer.from_file(path)
    grammar.check(tok)
    return tok

