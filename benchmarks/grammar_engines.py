"""Grammar engines for JSON-schema constrained decoding, on Mixtral's real vocabularies.

    python benchmarks/grammar_engines.py --engine llguidance|xgrammar|outlines-core|lm-format-enforcer \\
        --tokenizer v1|v3 --out RESULT.json [--schemas a,b,c,d,e] [--seeds 5] [--max-tokens 200] \\
        [--tokenizer-dir DIR]
    python benchmarks/grammar_engines.py table RESULT.json... > table.md

One engine per process, so that each runs in its own venv with only its own dependencies:
`python -m venv V && V/bin/pip install <engine>==<version> sentencepiece jsonschema` (xgrammar
requires torch: `pip install torch==2.13.0` into V first, or pip pulls the CUDA build). The
vocabularies are the SentencePiece files that mistral-common ships (v1: 32000 pieces, Mixtral-8x7B;
v3: 32768, Mixtral-8x22B), found in an installed mistral-common or in this checkout's `.venv`, or
in `--tokenizer-dir`; their sha256 are checked.

Each engine gets the vocabulary its own way, from the same SentencePiece pieces: '▁' is a space,
`<0xAB>` the single byte 0xAB, control pieces (`<unk>`, `<s>`, `</s>`, v3's `[INST]`...) are special
and never allowed, EOS is 2. For each schema (`SCHEMAS`) it measures:

- **setup**: the package's import and building its tokenizer data from the pieces, once per process;
- **compile**: schema to a matcher ready for the first mask, twice (the second shows the engine's
  cache, where it has one);
- **mask / advance**: per step of `--seeds` constrained random walks of up to `--max-tokens` tokens
  (each step: the allowed-token mask, then a token drawn uniformly from it, then the engine consumes
  it); median and p99 over all steps of all walks, and the first mask of a walk on its own. Then
  each walk is finished, untimed, preferring EOS and tokens that end in `"`, `}` or `]`, and its text
  is checked with `jsonschema` (`valid` counts the walks that ended in a valid document);
- **peak RSS** of the process, and the installed size of the engine's distribution and of its
  dependency closure without torch (from the venv's RECORD files).

lm-format-enforcer computes its mask inside `get_allowed_tokens(sequence)`, which also consumes the
last token: its advance column is that call's bookkeeping only, and its mask is a list of ids, not a
bitmask. JSON whitespace: none for llguidance and xgrammar (compact `,` and `:`), outlines-core's
default `[ ]?`, lm-format-enforcer's default (up to 12 in a row); free whitespace would let a uniform
walk spend most of its steps on whitespace tokens. Timings are wall-clock, one Python thread
driving each engine with its default threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import resource
import sys
import time
from array import array
from importlib import metadata, resources
from pathlib import Path

TOKENIZERS = {  # name -> (file in mistral_common/data, sha256), as in tests/conftest.py
    "v1": ("tokenizer.model.v1", "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"),
    "v3": (
        "mistral_instruct_tokenizer_240323.model.v3",
        "9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33",
    ),
}
EOS, BOS = 2, 1

_ARGS = {
    f"f{i}": {
        "type": "object",
        "properties": {"x": {"type": "integer"}, f"p{i}": {"type": "string", "maxLength": 16}},
        "required": [f"p{i}"],
        "additionalProperties": False,
    }
    for i in range(5)
}
SCHEMAS = {
    "a": ("any JSON object", {"type": "object"}),
    "b": (
        "small object",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "enum": ["a", "b", "c"]},
                    "minItems": 1,
                    "maxItems": 3,
                },
            },
            "required": ["name", "age", "tags"],
            "additionalProperties": False,
        },
    ),
    "c": (
        "medium: $defs/$ref, anyOf, pattern",
        {
            "$defs": {
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string", "maxLength": 40},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["street", "zip"],
                    "additionalProperties": False,
                },
                "item": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                        "price": {"type": "number", "minimum": 0, "maximum": 10000},
                    },
                    "required": ["sku", "qty", "price"],
                    "additionalProperties": False,
                },
            },
            "type": "object",
            "properties": {
                "version": {"const": 2},
                "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                "customer": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 30},
                        "contact": {
                            "anyOf": [
                                {
                                    "type": "object",
                                    "properties": {"email": {"type": "string", "maxLength": 40}},
                                    "required": ["email"],
                                    "additionalProperties": False,
                                },
                                {
                                    "type": "object",
                                    "properties": {
                                        "phone": {"type": "string", "pattern": "^\\+?[0-9]{6,12}$"}
                                    },
                                    "required": ["phone"],
                                    "additionalProperties": False,
                                },
                            ]
                        },
                        "address": {"$ref": "#/$defs/address"},
                    },
                    "required": ["name", "contact", "address"],
                    "additionalProperties": False,
                },
                "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 4},
                "discount": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]},
                "status": {"enum": ["new", "paid", "shipped"]},
            },
            "required": ["version", "order_id", "customer", "items", "status"],
            "additionalProperties": False,
        },
    ),
    "d": (
        "tool call: 5 names, anyOf 5 argument objects",
        {
            "type": "object",
            "properties": {"name": {"enum": list(_ARGS)}, "arguments": {"anyOf": list(_ARGS.values())}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
    ),
    "e": (
        "strings with non-ASCII and emoji",
        {
            "type": "object",
            "properties": {
                "greeting": {
                    "const": "héllo 😀 🦀 ǅ"
                },  # 🦀 and ǅ have no piece in either vocabulary: bytes only
                "mood": {"enum": ["café é", "🦀 crab", "𝄞 clef"]},
                "note": {"type": "string", "maxLength": 12},
                "words": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            },
            "required": ["greeting", "mood", "note", "words"],
            "additionalProperties": False,
        },
    ),
}


class Vocab:
    """One SentencePiece vocabulary as every engine needs it."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.size = self.sp.get_piece_size()
        self.pieces = [self.sp.id_to_piece(i) for i in range(self.size)]
        self.special = [i for i in range(self.size) if self.sp.is_control(i) or self.sp.is_unknown(i)]
        special = set(self.special)
        self.byte_ids = {i for i in range(self.size) if self.sp.is_byte(i)}
        self.bytes = [
            p.encode()
            if i in special
            else bytes([int(p[3:5], 16)])
            if i in self.byte_ids
            else p.replace("\u2581", " ").encode()
            for i, p in enumerate(self.pieces)
        ]
        self.regular = [i for i in range(self.size) if i not in special]
        self._newline = self.sp.piece_to_id("<0x0A>")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without SentencePiece's dummy-prefix space: encode '\\n' + text, drop
        the '▁' and '<0x0A>' it starts with."""
        ids = self.sp.encode("\n" + text)
        cut = ids.index(self._newline) + 1
        assert all(self.pieces[i] == "\u2581" for i in ids[: cut - 1]), ids[:cut]
        return ids[cut:]


def find_tokenizer(name: str, directory: Path | None) -> Path:
    fname, sha = TOKENIZERS[name]
    if directory is None:
        try:
            directory = Path(str(resources.files("mistral_common") / "data"))
        except ModuleNotFoundError:
            venv = sorted(
                (Path(__file__).resolve().parents[1] / ".venv" / "lib").glob("python*/site-packages")
            )
            directory = venv[0] / "mistral_common" / "data" if venv else Path(".")
    path = directory / fname
    if not path.is_file():
        sys.exit(f"{path} not found: pass --tokenizer-dir (mistral-common's data folder)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha:
        sys.exit(f"unexpected sha256 {digest} of {path}")
    return path


def bits_to_ids(words, vocab_size: int) -> list[int]:
    """The set bits of a little-endian bitmask of 32-bit words."""
    out = []
    for w, word in enumerate(words):
        word &= 0xFFFFFFFF
        while word:
            low = word & -word
            i = w * 32 + low.bit_length() - 1
            if i < vocab_size:
                out.append(i)
            word ^= low
    return out


# -- engines: setup(vocab); compile(schema) -> compiled; start(compiled) -> matcher with fill(), allowed(),
#    advance(token) -> bool, done() -------------------------------------------------------------
class EngineError(Exception):
    pass


class Llguidance:
    dist = "llguidance"
    module = "llguidance"

    def __init__(self, vocab: Vocab):
        import llguidance as llg

        self.llg = llg

        class Wrapped:  # what llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id = EOS, BOS
            tokens = vocab.bytes
            special_token_ids = vocab.special

            def __call__(self, data: bytes) -> list[int]:
                return vocab.encode(data.decode("utf-8", errors="replace"))

        self.tok = llg.LLTokenizer(llg.TokenizerWrapper(Wrapped()))
        self.words = (vocab.size + 31) // 32

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False}
        )
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise EngineError(m.get_error())
        return m

    def start(self, compiled):
        return _LlgMatcher(compiled.deep_copy(), self.words, self.tok.vocab_size)


class _LlgMatcher:
    def __init__(self, m, words: int, vocab_size: int):
        self.m, self.vocab_size = m, vocab_size
        self.mask = array("i", bytes(4 * words))
        self.ptr, self.nbytes = self.mask.buffer_info()[0], 4 * words

    def fill(self):
        self.m.unsafe_compute_mask_ptr(self.ptr, self.nbytes)

    def allowed(self):
        return bits_to_ids(self.mask, self.vocab_size)

    def advance(self, token: int) -> bool:
        return self.m.consume_token(token)

    def done(self) -> bool:
        return self.m.is_stopped()


class Xgrammar:
    dist = "xgrammar"
    module = "xgrammar"

    def __init__(self, vocab: Vocab):
        import xgrammar as xgr

        self.xgr = xgr
        special = set(
            vocab.special
        )  # xgrammar takes empty pieces as special; it decodes '▁' and <0xAB> itself
        pieces = ["" if i in special else p for i, p in enumerate(vocab.pieces)]
        info = xgr.TokenizerInfo(
            pieces, xgr.VocabType.BYTE_FALLBACK, vocab_size=vocab.size, stop_token_ids=[EOS]
        )
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=True)
        self.vocab_size = vocab.size

    def compile(self, schema: dict):
        compiled = self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        self.xgr.GrammarMatcher(compiled)  # part of what the first request waits for
        return compiled

    def start(self, compiled):
        return _XgrMatcher(self.xgr, compiled, self.vocab_size)


class _XgrMatcher:
    def __init__(self, xgr, compiled, vocab_size: int):
        self.m, self.vocab_size = xgr.GrammarMatcher(compiled), vocab_size
        self.mask = xgr.allocate_token_bitmask(1, vocab_size)

    def fill(self):
        self.m.fill_next_token_bitmask(self.mask)

    def allowed(self):
        return bits_to_ids(self.mask[0].tolist(), self.vocab_size)

    def advance(self, token: int) -> bool:
        return self.m.accept_token(token)

    def done(self) -> bool:
        return self.m.is_terminated()


class OutlinesCore:
    dist = "outlines-core"
    module = "outlines_core"

    def __init__(self, vocab: Vocab):
        import outlines_core as oc

        self.oc = oc
        by_bytes: dict[bytes, list[int]] = {}
        for i in vocab.regular:
            by_bytes.setdefault(vocab.bytes[i], []).append(i)
        self.vocabulary = oc.Vocabulary(EOS, by_bytes)
        self.vocab_size = vocab.size

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def start(self, compiled):
        return _OutlinesMatcher(self.oc.Guide(compiled), self.vocab_size)


class _OutlinesMatcher:
    def __init__(self, guide, vocab_size: int):
        self.g, self.vocab_size = guide, vocab_size
        words = (vocab_size + 31) // 32
        self.mask = array("i", bytes(4 * words))
        self.ptr, self.words = self.mask.buffer_info()[0], words

    def fill(self):
        self.g.write_mask_into(self.ptr, self.words, 4)

    def allowed(self):
        return bits_to_ids(self.mask, self.vocab_size)

    def advance(self, token: int) -> bool:
        self.g.advance(token, return_tokens=False)
        return True

    def done(self) -> bool:
        return False  # the walk ends on EOS, which the mask offers in a final state


class LmFormatEnforcer:
    dist = "lm-format-enforcer"
    module = "lmformatenforcer"

    def __init__(self, vocab: Vocab):
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer, TokenEnforcerTokenizerData

        self.parser, self.enforcer = JsonSchemaParser, TokenEnforcer
        regular = [
            (i, vocab.bytes[i].decode("utf-8", errors="replace"), vocab.pieces[i].startswith("\u2581"))
            for i in vocab.regular
        ]

        def decode(
            ids: list[int],
        ) -> str:  # as its transformers integration: drop a trailing partial character
            return b"".join(vocab.bytes[i] for i in ids).decode("utf-8", errors="replace").rstrip("\ufffd")

        self.data = TokenEnforcerTokenizerData(regular, decode, EOS, use_bitmask=False, vocab_size=vocab.size)

    def compile(self, schema: dict):
        self.enforcer(self.data, self.parser(schema))
        return schema

    def start(self, compiled):  # a fresh enforcer: one keeps the masks of every prefix it has seen
        return _LmfeMatcher(self.enforcer(self.data, self.parser(compiled)))


class _LmfeMatcher:
    def __init__(self, enforcer):
        self.e, self.seq, self.ids = enforcer, [BOS], []

    def fill(self):
        self.ids = self.e.get_allowed_tokens(self.seq).allowed_tokens

    def allowed(self):
        return sorted(set(self.ids))

    def advance(self, token: int) -> bool:
        self.seq.append(token)
        return True

    def done(self) -> bool:
        return False


ENGINES = {
    "llguidance": Llguidance,
    "xgrammar": Xgrammar,
    "outlines-core": OutlinesCore,
    "lm-format-enforcer": LmFormatEnforcer,
}


# -- measuring ---------------------------------------------------------------------------------
def _closing_class(vocab: Vocab) -> list[int]:
    """Finishing preference per token: 2 if it ends in a closing character, 1 for the rest."""
    return [2 if b.rstrip().endswith((b'"', b"}", b"]")) else 1 for b in vocab.bytes]


def walk(
    engine, compiled, vocab: Vocab, closing: list[int], seed: int, max_tokens: int, finish_tokens: int
) -> dict:
    rng = random.Random(seed)
    m = engine.start(compiled)
    mask_ns, adv_ns, out, err, ended = [], [], [], None, False
    for step in range(max_tokens + finish_tokens):
        timed = step < max_tokens
        t = time.perf_counter_ns()
        m.fill()
        t_mask = time.perf_counter_ns() - t
        ids = m.allowed()
        if not ids:
            err = "empty mask"
            break
        if timed:
            tok = rng.choice(ids)
        elif EOS in ids:
            tok = EOS
        else:
            best = max(closing[i] for i in ids)
            tok = rng.choice([i for i in ids if closing[i] == best])
        if timed:
            mask_ns.append(t_mask)
        if tok == EOS:
            ended = True
            break
        t = time.perf_counter_ns()
        ok = m.advance(tok)
        if timed:
            adv_ns.append(time.perf_counter_ns() - t)
        if not ok:
            err = f"token {tok} refused after it was allowed"
            break
        out.append(tok)
        if m.done():
            ended = True
            break
    return {"mask_ns": mask_ns, "adv_ns": adv_ns, "tokens": out, "ended": ended, "error": err}


def check(tokens: list[int], vocab: Vocab, schema: dict) -> tuple[bool, str]:
    import jsonschema

    if any(t in vocab.special for t in tokens):
        return False, "special token in output"
    try:
        jsonschema.validate(json.loads(b"".join(vocab.bytes[t] for t in tokens).decode("utf-8")), schema)
    except (ValueError, jsonschema.ValidationError) as e:
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return True, ""


def _us(ns: list[int], q: float) -> float | None:
    if not ns:
        return None
    s = sorted(ns)
    return round(s[min(len(s) - 1, int(q * len(s)))] / 1e3, 2)


def bench_schema(engine, vocab: Vocab, closing: list[int], schema: dict, seeds: int, max_tokens: int) -> dict:
    res: dict = {}
    try:
        compiled = None
        for key in ("compile_ms", "compile2_ms"):
            t = time.perf_counter()
            compiled = engine.compile(schema)
            res[key] = round((time.perf_counter() - t) * 1e3, 2)
    except Exception as e:  # an engine that cannot take the schema: recorded, not fatal
        res["error"] = f"compile: {type(e).__name__}: {str(e)[:300]}"
        return res
    mask, adv, first, walks = [], [], [], []
    for seed in range(seeds):
        try:
            w = walk(engine, compiled, vocab, closing, seed, max_tokens, finish_tokens=300)
        except Exception as e:
            w = {
                "mask_ns": [],
                "adv_ns": [],
                "tokens": [],
                "ended": False,
                "error": f"{type(e).__name__}: {str(e)[:300]}",
            }
        valid, why = (
            check(w["tokens"], vocab, schema)
            if w["ended"] and not w["error"]
            else (False, w["error"] or "not ended")
        )
        mask += w["mask_ns"]
        adv += w["adv_ns"]
        first += w["mask_ns"][:1]
        text = b"".join(vocab.bytes[t] for t in w["tokens"]).decode("utf-8", errors="replace")
        walks.append(
            {
                "seed": seed,
                "tokens": len(w["tokens"]),
                "timed_steps": len(w["mask_ns"]),
                "valid": valid,
                "why": why,
                "byte_tokens": sum(t in vocab.byte_ids for t in w["tokens"]),
                "text": text[:300],
            }
        )
    res.update(
        mask_us_median=_us(mask, 0.5),
        mask_us_p99=_us(mask, 0.99),
        mask_us_max=_us(mask, 1.0),
        mask_steps_over_1ms=sum(ns > 1_000_000 for ns in mask),
        first_mask_us_median=_us(first, 0.5),
        advance_us_median=_us(adv, 0.5),
        advance_us_p99=_us(adv, 0.99),
        steps=len(mask),
        valid=sum(w["valid"] for w in walks),
        walks=walks,
    )
    return res


def installed_bytes(dist_name: str) -> tuple[int, int, list[str]]:
    """Bytes of `dist_name`'s files, of its whole dependency closure without torch, and the closure."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement

    def size(d) -> int:
        return sum(f.size or 0 for f in d.files or [])

    seen, todo = {}, [dist_name]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            d = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = d
        for r in map(Requirement, d.requires or []):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    own = size(seen[dist_name.lower()])
    closure = sum(size(d) for k, d in seen.items() if k != "torch")
    return own, closure, sorted(f"{d.metadata['Name']}=={d.version}" for d in seen.values())


def main_run(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, choices=ENGINES)
    p.add_argument("--tokenizer", required=True, choices=TOKENIZERS)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--schemas", default=",".join(SCHEMAS), help="comma-separated keys of SCHEMAS [all]")
    p.add_argument("--seeds", type=int, default=5, help="random walks per schema [5]")
    p.add_argument("--max-tokens", type=int, default=200, help="timed steps per walk [200]")
    p.add_argument("--tokenizer-dir", type=Path, default=None, help="mistral-common's data folder")
    a = p.parse_args(argv)

    vocab = Vocab(find_tokenizer(a.tokenizer, a.tokenizer_dir))
    closing = _closing_class(vocab)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cls = ENGINES[a.engine]
    t = time.perf_counter()
    __import__(cls.module)
    import_s = time.perf_counter() - t
    t = time.perf_counter()
    engine = cls(vocab)
    setup_s = time.perf_counter() - t
    own, closure, deps = installed_bytes(cls.dist)
    result = {
        "engine": a.engine,
        "version": metadata.version(cls.dist),
        "tokenizer": a.tokenizer,
        "vocab_size": vocab.size,
        "special_tokens": len(vocab.special),
        "python": platform.python_version(),
        "seeds": a.seeds,
        "max_tokens": a.max_tokens,
        "import_s": round(import_s, 3),
        "setup_ms": round(setup_s * 1e3, 1),
        "installed_bytes": own,
        "closure_bytes_without_torch": closure,
        "closure": deps,
        "schemas": {},
    }
    for key in a.schemas.split(","):
        title, schema = SCHEMAS[key]
        r = bench_schema(engine, vocab, closing, schema, a.seeds, a.max_tokens)
        result["schemas"][key] = {"title": title} | r
        print(
            f"{a.engine} {a.tokenizer} {key}: " + json.dumps({k: v for k, v in r.items() if k != "walks"}),
            flush=True,
        )
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["rss_before_engine_mib"] = round(rss0 / 1024, 1)
    a.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")


# -- table -------------------------------------------------------------------------------------
def _f(x, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def main_table(paths: list[str]) -> None:
    results = sorted(
        (json.loads(Path(p).read_text()) for p in paths), key=lambda r: (r["engine"], r["tokenizer"])
    )
    print(
        "| engine | vocab | import s | tokenizer setup ms | peak RSS MiB | installed MB | closure without torch MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['engine']} {r['version']} | {r['tokenizer']} | {r['import_s']:.2f} | {r['setup_ms']:.0f} | "
            f"{r['peak_rss_mib']:.0f} | {r['installed_bytes'] / 1e6:.1f} | {r['closure_bytes_without_torch'] / 1e6:.1f} |"
        )
    print()
    print(
        "| schema | engine | vocab | compile ms (2nd) | first mask us | mask us median / p99 / max | steps > 1 ms "
        "| advance us median / p99 | valid walks |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key in SCHEMAS:
        for r in results:
            s = r["schemas"].get(key)
            if s is None:
                continue
            head = f"| {key} | {r['engine']} | {r['tokenizer']} |"
            if "error" in s:
                print(f"{head} fails: {s['error'][:120].replace('|', '/')} | | | | | |")
                continue
            print(
                f"{head} {_f(s['compile_ms'])} ({_f(s['compile2_ms'])}) | {_f(s['first_mask_us_median'], 0)} | "
                f"{_f(s['mask_us_median'])} / {_f(s['mask_us_p99'], 0)} / {_f(s['mask_us_max'], 0)} | "
                f"{s['mask_steps_over_1ms']} of {s['steps']} | {_f(s['advance_us_median'])} / "
                f"{_f(s['advance_us_p99'], 0)} | {s['valid']}/{len(s['walks'])} |"
            )


if __name__ == "__main__":
    if sys.argv[1:2] == ["table"]:
        main_table(sys.argv[2:])
    else:
        main_run(sys.argv[1:])
