"""Constrained decoding: the vocabulary as the grammar engine sees it, masks against a plain check
token by token, schema-valid output from a model that knows nothing of JSON, and refusals."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from mixtral_cli.checkpoints.tokenizer import Tokenizer
from mixtral_cli.engine.generate import Completion, Session
from mixtral_cli.engine.grammar import Constraint, Grammar, GrammarError, raw_encode, token_bytes
from mixtral_cli.settings import GenerationConfig, SamplingConfig

SMALL = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
         "properties": {"name": {"type": "string", "maxLength": 20},
                        "age": {"type": "integer", "minimum": 0, "maximum": 150},
                        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}}}
MEDIUM = {"$defs": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "point": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1},
                                                               "y": {"type": "number"}},
                              "required": ["x", "y"], "additionalProperties": False}},
          "type": "object", "additionalProperties": False, "required": ["code", "where", "kind"],
          "properties": {"code": {"$ref": "#/$defs/code"}, "where": {"$ref": "#/$defs/point"},
                         "kind": {"anyOf": [{"const": "v2"}, {"type": "integer", "minimum": 3, "maximum": 9}]},
                         "note": {"type": ["string", "null"], "minLength": 2, "maxLength": 8}}}
NON_ASCII = {"type": "object", "required": ["greeting", "mood"], "additionalProperties": False,
             "properties": {"greeting": {"enum": ["héllo wörld", "こんにちは"]}, "mood": {"const": "😀🎉🦀𝄞"}}}
SCHEMAS = {"small": SMALL, "medium": MEDIUM, "non-ascii": NON_ASCII}


@pytest.fixture(scope="module", params=["v1", "v3"])
def tok(request, v1_tokenizer_path, v3_tokenizer_path) -> Tokenizer:
    return Tokenizer.from_file(v1_tokenizer_path if request.param == "v1" else v3_tokenizer_path)


def test_token_bytes_spell_what_the_tokenizer_decodes(tok):
    table = token_bytes(tok)
    ids = tok.encode("Ünïcode ✓ 😀 {\"a\": [1, 2]}\n\ttab")
    assert b"".join(table[i] for i in ids).decode()[1:] == tok.decode(ids)  # [1:]: the dummy-prefix space
    assert table[tok.eos_id] == b"\xff</s>" and table[tok.bos_id] == b"\xff<s>"
    assert sum(1 for b in table if len(b) == 1 and not b.isascii()) == 128  # the byte-fallback pieces 0x80..0xFF


def test_raw_encode_has_no_dummy_prefix(tok):
    for text in ('name"', " x", "é😀", "a\nb"):
        ids = raw_encode(tok, text)
        assert b"".join(token_bytes(tok)[i] for i in ids).decode() == text
    assert tok.encode('name"') != raw_encode(tok, 'name"')  # the plain encoding starts with '▁name'


def walk(grammar: Grammar, tok: Tokenizer, seed: int, limit: int = 400) -> tuple[list[int], Constraint]:
    """Uniformly random allowed tokens until the grammar is done or EOS is drawn."""
    constraint, rng, out = Constraint(grammar, tok), random.Random(seed), []
    while not constraint.done and len(out) < limit:
        allowed = constraint.allowed().nonzero().flatten().tolist()
        token = rng.choice(allowed)
        if token == tok.eos_id:
            break
        constraint.advance(token)
        out.append(token)
    return out, constraint


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_walks_give_valid_documents(tok, name):
    grammar = Grammar.json_schema(SCHEMAS[name])
    grammar.check(tok)
    for seed in range(6):
        out, constraint = walk(grammar, tok, seed)
        assert constraint.complete, tok.decode(out)
        jsonschema.validate(json.loads(tok.decode(out)), SCHEMAS[name])


def test_mask_agrees_with_trying_each_token(tok):
    """The fast mask against the plain rule: a token is allowed iff the grammar accepts it next."""
    grammar = Grammar.json_schema(SMALL)
    out, _ = walk(grammar, tok, seed=1)
    constraint = Constraint(grammar, tok)
    for step, token in enumerate(out[:12]):
        allowed = constraint.allowed()
        rng = random.Random(step)
        probe = rng.sample(range(tok.vocab_size), 300) + allowed.nonzero().flatten().tolist()[:50]
        for t in probe:
            if t == tok.eos_id:
                continue
            fork = constraint._matcher.deep_copy()
            assert bool(allowed[t]) == (fork.try_consume_tokens([t]) == 1), (step, t)
        constraint.advance(token)


def test_gbnf_and_lark_grammars(tok):
    gbnf = Grammar.gbnf('root ::= "yes" | "no" | "maybe " [0-9]')
    lark = Grammar.lark('start: "(" NUMBER ")"\nNUMBER: /[0-9]{1,3}/')
    for grammar, valid in ((gbnf, {"yes", "no", *(f"maybe {d}" for d in range(10))}), (lark, None)):
        grammar.check(tok)
        for seed in range(5):
            text = tok.decode(walk(grammar, tok, seed)[0])
            assert text in valid if valid else text[0] == "(" and text[-1] == ")" and text[1:-1].isdigit()


@pytest.mark.parametrize("schema, words", [
    ({"not": {"type": "string"}}, "not"),
    ({"type": "strin"}, "strin"),
    ({"$ref": "#/$defs/missing"}, "missing"),
    ({"type": "string", "pattern": "(("}, "regex"),
    ([1, 2], "must be an object"),
])
def test_unusable_schemas_are_refused_in_one_line(tok, schema, words):
    with pytest.raises(GrammarError) as err:
        Grammar.json_schema(schema, "response_format.json_schema.schema").check(tok)
    message = str(err.value)
    assert words in message and "\n" not in message and message.startswith("response_format.json_schema.schema: ")


def test_huge_and_deep_schemas_are_refused_before_compiling():
    deep: dict = {"type": "object"}
    for _ in range(70):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(GrammarError, match="deeper than 64"):
        Grammar.json_schema(deep)
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                             for i in range(3000)}}
    with pytest.raises(GrammarError, match="bytes; at most"):
        Grammar.json_schema(wide)
    with pytest.raises(GrammarError, match="GBNF"):
        Grammar.gbnf("root ::= (")


# -- generation on the tiny random model --------------------------------------------------------------
def generate(engine, grammar: Grammar | None, seed: int, max_tokens: int = 200, **sampling) -> Completion:
    cfg = GenerationConfig(max_tokens=max_tokens, grammar=grammar,
                           sampling=SamplingConfig(temperature=0.8, seed=seed, **sampling))
    prompt = engine.tokenizer.encode_instruct([{"role": "user", "content": "Describe a person as JSON."}])
    completion = Completion(Session(engine.model), engine.tokenizer, prompt, cfg)
    completion.text = "".join(completion)
    return completion


@pytest.mark.parametrize("name", ["small", "non-ascii"])
def test_a_model_that_knows_no_json_writes_valid_documents(engine_fp32, name):
    grammar = Grammar.json_schema(SCHEMAS[name])
    for seed in range(8):
        c = generate(engine_fp32, grammar, seed)
        jsonschema.validate(json.loads(c.text), SCHEMAS[name])
        assert c.finish_reason == "stop" and len(c.token_ids) <= 200


def test_any_json_object_and_every_sampler_setting(engine_fp32):
    grammar = Grammar.json_object()
    for seed, extra in enumerate([{}, {"top_k": 1}, {"top_p": 0.5, "min_p": 0.2},
                                  {"repeat_penalty": 1.3, "presence_penalty": 1.0, "frequency_penalty": 0.5}]):
        c = generate(engine_fp32, grammar, seed, max_tokens=200, **extra)
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:  # the tokens ran out first: a truncated document is never called complete
            assert c.finish_reason == "length" and len(c.token_ids) == 200 and not c.constraint.done


def test_running_out_of_tokens_is_length_not_stop(engine_fp32):
    c = generate(engine_fp32, Grammar.json_schema(SMALL), seed=0, max_tokens=5)
    assert c.finish_reason == "length" and len(c.token_ids) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.text)


def test_logit_bias_cannot_break_the_grammar(engine_fp32):
    tok = engine_fp32.tokenizer
    brace = raw_encode(tok, "}")[0]
    quote = raw_encode(tok, '"')[0]
    c = generate(engine_fp32, Grammar.json_schema(SMALL), seed=3, logit_bias={brace: 100, quote: -100})
    jsonschema.validate(json.loads(c.text), SMALL)


def test_without_a_grammar_the_mask_is_not_applied(engine_fp32):
    free = generate(engine_fp32, None, seed=5, max_tokens=20)
    assert free.constraint is None and free.finish_reason == "length"
    assert not torch.equal(torch.tensor(free.token_ids),
                           torch.tensor(generate(engine_fp32, Grammar.json_object(), seed=5, max_tokens=20).token_ids))


def test_a_grammar_that_cannot_finish_in_the_context_ends_with_length(engine_fp32):
    endless = Grammar.json_schema({"type": "string", "minLength": 5000})
    c = generate(engine_fp32, endless, seed=0, max_tokens=None)
    room = engine_fp32.model.max_len - len(c.prompt_ids)
    assert c.finish_reason == "length" and len(c.token_ids) == room and c.text.lstrip().startswith('"')


def test_an_engine_failure_mid_output_is_a_grammar_error(tok):
    """The engine's error state (here from a token the mask forbade) surfaces as a GrammarError."""
    constraint = Constraint(Grammar.json_object(), tok)
    forbidden = raw_encode(tok, "x")[0]
    assert not constraint.allowed()[forbidden]
    with pytest.raises(GrammarError, match="stopped mid-output"):
        constraint.advance(forbidden)
