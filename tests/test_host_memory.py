"""The CPU weight arena: allocation, reads straight from the files, and what a CPU engine puts in it."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch

from mixtral_cli.checkpoints.config import ModelArgs
from mixtral_cli.checkpoints.layout import EMBEDDING, EXPERT_PROJS, Quantization, packed_expert_bytes
from mixtral_cli.checkpoints.quantize import quantize_checkpoint
from mixtral_cli.checkpoints.reader import Checkpoint
from mixtral_cli.engine import loader as runtime
from mixtral_cli.engine.loader import build_engine
from mixtral_cli.engine.plan import arena_bytes, plan_host, streamed_shared
from mixtral_cli.errors import UserError
from mixtral_cli.kernels.formats import ALIGN, QuantizedTensor
from mixtral_cli.settings import RuntimeOptions
from mixtral_cli.system.host_memory import HOST_HEADROOM, HUGE_PAGE, HostArena, room_for
from tests.tiny import write_checkpoint


def test_arena_packs_aligned_tensors_in_one_huge_page_aligned_block():
    arena = HostArena(3 * HUGE_PAGE)
    a = arena.alloc((3,), torch.uint8)
    b = arena.alloc((5, 7), torch.float32)
    c = arena.copy(torch.arange(10, dtype=torch.int64), torch.bfloat16)
    assert a.data_ptr() % HUGE_PAGE == 0  # the block starts on a huge page
    assert (b.data_ptr() - a.data_ptr()) == ALIGN and c.data_ptr() % ALIGN == 0
    assert c.dtype == torch.bfloat16 and c.tolist() == list(range(10))
    if sys.platform == "linux" and hasattr(mmap, "MADV_HUGEPAGE"):
        assert arena.huge_pages
    with pytest.raises(RuntimeError, match="cannot hold"):
        arena.alloc((3 * HUGE_PAGE,), torch.uint8)
    del arena
    b.fill_(1.5)  # the views keep the block alive
    assert float(b.sum()) == 1.5 * 35


def test_reads_into_the_arena_equal_the_mapped_tensors(tiny_ckpt):
    ck = Checkpoint(tiny_ckpt)
    names = list(ck.tensors)
    arena = HostArena(sum(ck.tensors[n].nbytes * 4 // ck.tensors[n].dtype.itemsize * 2 + 2 * ALIGN for n in names))
    for name in names:
        mapped = ck.tensor(name)
        read = ck.tensor(name, into=arena)
        assert read.dtype == mapped.dtype and torch.equal(read, mapped), name
        assert arena._block.data_ptr() <= read.data_ptr() < arena._block.data_ptr() + arena.size
        as_f32 = ck.tensor(name, into=arena, dtype=torch.float32)
        assert as_f32.dtype == torch.float32 and torch.equal(as_f32, mapped.float()), name


def test_a_truncated_shard_is_one_clear_error(tmp_path):
    d = write_checkpoint(tmp_path / "m", shards=1)
    ck = Checkpoint(d)  # headers are fine
    shard = next(d.glob("*.safetensors"))
    last = max(ck.tensors.values(), key=lambda i: i.offset)
    name = next(n for n, i in ck.tensors.items() if i is last)
    with open(shard, "r+b") as f:
        f.truncate(last.offset + last.nbytes // 2)
    arena = HostArena(last.nbytes + ALIGN)
    with pytest.raises(UserError, match="ends early"):
        ck.tensor(name, into=arena)


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_cpu_engine_streams_its_weights_from_the_arena(tiny_ckpt, tmp_path, bits):
    """Every shared weight but the embedding (quantized attention and output parts included) and every
    resident expert part lie, without overlap, in one block of exactly `arena_bytes`; the embedding
    stays in the mapped file."""
    src = tiny_ckpt if bits is None else quantize_checkpoint(tiny_ckpt, tmp_path / f"q{bits}", bits, 64)
    ck = Checkpoint(src)
    eng = build_engine(ck, None, RuntimeOptions(device="cpu", dtype="bfloat16", ctx_size=32))
    m, args = eng.model, ck.args
    stored = dict(m.named_parameters()) | dict(m.named_buffers())  # a QuantLinear's parts are buffers
    tensors = [stored[name] for name in streamed_shared(args, ck.quant)]
    assert bits is None or "lm_head.qweight" in streamed_shared(args, ck.quant)
    for layer in m.experts.experts:
        for expert in layer:
            for proj in EXPERT_PROJS:
                lin = getattr(expert, proj)
                tensors += list(lin.qt.parts.values()) if hasattr(lin, "qt") else [lin.weight]
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))  # no overlap
    start, size = spans[0][0], arena_bytes(args, ck.quant, 2, experts=True)
    assert start % HUGE_PAGE == 0 and spans[-1][1] <= start + size and spans[-1][1] > start + size - ALIGN
    embed = m.get_parameter(EMBEDDING)
    assert not start <= embed.data_ptr() < start + size
    assert all(isinstance(e.w1.qt, QuantizedTensor) for e in m.experts.experts[0]) if bits else True


def test_tied_embeddings_stream_from_the_arena(tmp_path):
    """With tied embeddings the output layer is the embedding table, which a step reads whole: it goes to
    the arena, and the model's logits are those of the mapped weights."""
    from tests.tiny import TINY_CONFIG

    d = write_checkpoint(tmp_path / "tied", dict(TINY_CONFIG, tie_word_embeddings=True), shards=1)
    ck = Checkpoint(d)
    assert EMBEDDING in streamed_shared(ck.args, ck.quant)
    eng = build_engine(ck, None, RuntimeOptions(device="cpu", dtype="float32", ctx_size=32))
    m = eng.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    embed = m.lm_head.weight
    assert torch.equal(embed, ck.tensor(EMBEDDING).float())
    span = arena_bytes(ck.args, Quantization(), 4, experts=True)
    ptrs = [p.data_ptr() for p in m.parameters()]
    assert max(ptrs) - min(ptrs) < span  # every weight in one arena (the experts, not parameters here, first)
    assert embed.data_ptr() in range(min(ptrs), min(ptrs) + span)
    logits = m(torch.tensor([1, 5, 9]), 0)
    assert logits.shape == (3, ck.args.vocab_size) and bool(torch.isfinite(logits).all())


def test_room_for_leaves_the_system_its_headroom():
    assert room_for(10, None)  # unknown: assume there is room
    assert room_for(10 * HUGE_PAGE, 10 * HUGE_PAGE + HOST_HEADROOM)
    assert not room_for(10 * HUGE_PAGE, 10 * HUGE_PAGE + HOST_HEADROOM - 1)


def test_host_plan_falls_back_to_the_mapped_files_only_for_a_checkpoint():
    """One policy for run, bench and info: a CPU model too large for the arena still runs from a
    checkpoint's mapped files, generated weights have no file to fall back on, and a CUDA run must
    fit its pinned store."""
    args = ModelArgs(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    dense = Quantization()
    arena = arena_bytes(args, dense, 2, experts=True)
    short = arena + HOST_HEADROOM - 1
    ok = plan_host(args, dense, "cpu", True, 2, True, arena + HOST_HEADROOM)
    assert ok.fits and not ok.mapped and ok.held == arena
    mapped = plan_host(args, dense, "cpu", True, 2, True, short)
    assert mapped.fits and mapped.mapped and mapped.held == 0
    generated = plan_host(args, dense, "cpu", True, 2, False, short)
    assert not generated.fits
    with pytest.raises(UserError, match="needs .* of host RAM") as e:
        generated.require()
    assert "--bits 4" in e.value.hint
    store = 2 * 8 * packed_expert_bytes(args, None, 2)
    cuda = plan_host(args, dense, "cuda", False, 2, True, store + HOST_HEADROOM - 1)
    assert cuda.pinned and cuda.store == store and not cuda.fits


def test_a_model_larger_than_ram_stays_memory_mapped(tiny_ckpt, monkeypatch):
    """Without room for the arena the CPU engine computes from the mapped file (the kernel can page it)
    and gives the same logits."""
    ids = torch.tensor([1, 5, 9, 4])
    opts = RuntimeOptions(device="cpu", dtype="bfloat16", ctx_size=32)
    in_arena = build_engine(Checkpoint(tiny_ckpt), None, opts).model(ids, 0)
    monkeypatch.setattr(runtime, "mem_available", lambda: HOST_HEADROOM + 1)
    ck = Checkpoint(tiny_ckpt)
    m = build_engine(ck, None, opts).model
    assert m.lm_head.weight.data_ptr() == ck.tensor("lm_head.weight").data_ptr()  # a view of the mapped file
    assert torch.equal(m(ids, 0), in_arena)
