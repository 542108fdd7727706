"""`mixtral perplexity`: score a text, save the model's distributions (`--save-logits`), or measure
their KL divergence from a base (`--kl-base`: a model, or a file saved earlier)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..engine.evaluate import divergence, perplexity, row_blocks, scored_rows, window_logprobs
from ..engine.loader import Engine
from ..engine.logits_file import LogitsReader, LogitsWriter
from ..errors import UserError
from . import ui


def read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{file} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {file} as UTF-8 text ({e})") from None


def text_ids(engine: Engine, file: Path, text: str) -> list[int]:
    ids = engine.tokenizer.encode(text, bos=True)
    if len(ids) < 2:
        raise UserError(f"{file} has no text to score", hint="perplexity needs at least one token after the BOS token")
    return ids


def model_base(base: Engine, engine: Engine, text: str, ids: list[int]) -> Callable[[list[int]], Iterator[torch.Tensor]]:
    """A base model's log-probabilities, after checking that it reads the text as the model does."""
    if base.args.vocab_size != engine.args.vocab_size:
        raise UserError(f"the base model's vocabulary has {base.args.vocab_size} tokens, the model's {engine.args.vocab_size}",
                        hint="compare models that share a tokenizer")
    if base.tokenizer.encode(text, bos=True) != ids:
        raise UserError("the base model has another tokenizer: it reads the text as other tokens",
                        hint="compare models that share a tokenizer")
    return lambda window: window_logprobs(base.model, window)


def file_base(reader: LogitsReader, engine: Engine, ctx: int, ids: list[int]) -> Callable[[list[int]], Iterator[torch.Tensor]]:
    """A logits file's rows, in the blocks `window_logprobs` makes, after checking it fits this run."""
    reader.check(engine.args.vocab_size, ctx, ids)
    return lambda window: (reader.read(r1 - r0) for _, _, r0, r1 in row_blocks(len(window)))


def score(engine: Engine, file: Path, text: str, ctx: int, *, json_out: bool, save_logits: Path | None = None,
          base: Engine | LogitsReader | None = None) -> None:
    """Print the perplexity, or with `base` the divergence report; with `save_logits`, also write the file."""
    ids = text_ids(engine, file, text)
    if base is not None:
        source = model_base(base, engine, text, ids) if isinstance(base, Engine) else file_base(base, engine, ctx, ids)
        result = divergence(engine.model, ids, ctx, source)
        if json_out:
            ui.print_json(result.as_dict())
        else:
            ui.divergence_report(result)
        return
    if save_logits is not None:
        with LogitsWriter(save_logits, engine.args.vocab_size, ctx, ids, scored_rows(ids, ctx)) as writer:
            result = perplexity(engine.model, ids, ctx, keep=writer.add)
    else:
        result = perplexity(engine.model, ids, ctx)
    if json_out:
        ui.print_json(result.as_dict())
    else:
        ui.out.print(f"perplexity {result.perplexity:.4f} over {result.tokens_scored} tokens in {result.windows} windows")
