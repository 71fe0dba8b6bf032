"""The weight-sync plan (weight_sync/plan.py), the trainer's publisher (weight_sync/send.py) and the
engine's receiver (weight_sync/receive.py), over a real gloo group; the vLLM layout rules
(weight_sync/vllm_layout.py) checked against vLLM's own weight loaders for tensor-parallel ranks that
cannot run here."""

from __future__ import annotations

import importlib
import socket
import threading
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from weight_sync.messages import (GroupAddress, SendReport, address_from_rpc, address_to_rpc, plan_from_rpc,
                                  plan_to_rpc, regions_from_rpc, regions_to_rpc)
from weight_sync.plan import ALIGN, Piece, Region, SyncPlan, merge_tp_regions, whole_tensor_regions
from weight_sync.receive import Receiver, fingerprint
from weight_sync.send import Publisher
from weight_sync.transport import make_group, warm_up


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the plan ---------------------------------------------------------------------------------
def test_region_pieces_must_tile_the_region_once():
    ok = Region("qkv", 0, (6, 4), "float32", (Piece("q", 0, 0, 0, 2), Piece("k", 0, 0, 2, 2), Piece("v", 0, 0, 4, 2)))
    ok.check()
    with pytest.raises(ValueError, match="gap or overlap"):  # rows 2..3 filled twice, 4..5 never
        Region("qkv", 0, (6, 4), "float32", (Piece("q", 0, 0, 0, 4), Piece("k", 0, 0, 2, 2))).check()
    with pytest.raises(ValueError, match="cover 4 of 6"):
        Region("qkv", 0, (6, 4), "float32", (Piece("q", 0, 0, 0, 2), Piece("k", 0, 0, 2, 2))).check()
    with pytest.raises(ValueError, match="only one"):
        Region("w", 0, (6, 4), "float32", (Piece("w", None), Piece("x", 0, 0, 0, 6))).check()


def test_plan_aligns_regions_cuts_buckets_and_round_trips():
    regions = [Region("a", 0, (3,), "float32", (Piece("a", None),)),  # 12 bytes -> next region at 256
               Region("b", 0, (100, 4), "bfloat16", (Piece("b", None),)),  # 800 bytes at 256
               Region("c", 0, (0, 4), "float32", (Piece("c", 0, 0, 0, 0),))]  # empty: left out
    plan = SyncPlan.build(regions[:2], bucket_bytes=700)  # cut to a multiple of ALIGN: 512
    assert [r.offset for r in plan.regions] == [0, ALIGN]
    assert plan.nbytes == ALIGN + 1024 and plan.bucket_bytes == 512
    assert plan.buckets == [(0, 512), (512, 1024), (1024, 1280)]
    assert list(plan.bucket_span(plan.regions[1])) == [0, 1, 2]  # bytes 256..1056
    assert plan_from_rpc(plan_to_rpc(plan)) == plan  # as it crosses vLLM's RPC
    assert SyncPlan.build(regions, 700) == plan  # an empty region (a rank with only padding rows) is left out


def test_messages_cross_vllm_rpc_as_plain_values_and_back():
    """vLLM's RPC carries only plain values: what the codec makes of a message is lists, dicts, str,
    int, float and None, and decoding it gives the message back."""
    def plain(x) -> bool:
        if isinstance(x, (list, dict)):
            return all(plain(v) for v in (x.values() if isinstance(x, dict) else x))
        return x is None or isinstance(x, (str, int, float))

    regions = [Region("qkv", 1, (6, 4), "bfloat16", (Piece("q", 0, 2, 0, 2), Piece("k", 0, 0, 2, 4)), 512),
               Region("norm", 0, (4,), "float32", (Piece("norm", None),), 0)]
    address = GroupAddress("10.0.0.1", 29500, 3, "nccl", 60.0)
    for encoded in (regions_to_rpc(regions), address_to_rpc(address)):
        assert plain(encoded), encoded
    assert regions_from_rpc(regions_to_rpc(regions)) == regions
    assert address_from_rpc(address_to_rpc(address)) == address


def test_merge_tp_regions_interleaves_ranks_by_parameter():
    def r(name, rank):
        return Region(name, rank, (2,), "float32", (Piece(name, None),))

    merged = merge_tp_regions([[r("x", 0), r("y", 0)], [r("x", 1), r("y", 1)]])
    assert [(m.param, m.tp_rank) for m in merged] == [("x", 0), ("x", 1), ("y", 0), ("y", 1)]


def test_publisher_rejects_a_plan_that_does_not_match_the_model():
    shapes = {"w": (4, 2), "b": (4,)}
    pub = Publisher(lambda: iter(()), shapes, None, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="does not have"):
        pub.set_plan(SyncPlan.build([Region("w", 0, (4, 2), "float32", (Piece("nope", None),))], 1 << 20))
    with pytest.raises(ValueError, match="has shape \\[4, 2\\]"):  # reads rows 2..5 of a 4-row tensor
        pub.set_plan(SyncPlan.build([Region("w", 0, (4, 2), "float32", (Piece("w", 0, 2, 0, 4),))], 1 << 20))
    with pytest.raises(ValueError, match="fill nothing from the trainer's \\['b'\\]"):
        pub.set_plan(SyncPlan.build([Region("w", 0, (4, 2), "float32", (Piece("w", None),))], 1 << 20))


# ---- publisher -> gloo broadcast -> receiver ----------------------------------------------
def _run_group(publisher: Publisher, receivers: list[Receiver], publishes: int) -> None:
    """The publisher (rank 0) and each receiver (ranks 1..) in threads of this process, over gloo."""
    address = GroupAddress("127.0.0.1", _port(), 1 + len(receivers), "gloo", 60.0)
    errors = []

    def member(rank: int) -> None:
        try:
            if rank == 0:
                publisher.join(address)
                for _ in range(publishes):
                    assert publisher.publish() == SendReport(publisher.plan.nbytes, mock.ANY)
            else:
                group = make_group(address, rank)
                warm_up(group, torch.device("cpu"))
                for _ in range(publishes):
                    receivers[rank - 1].receive(group)
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(address.world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


@pytest.mark.parametrize("streamed", [False, True])
def test_publish_fills_every_engine_parameter_exactly(streamed):
    """A trainer in float32, an engine in bfloat16 that stores its weights whole (the HF engine's plan):
    the engine ends bitwise equal to the trainer's weights cast to bfloat16, buckets cut through tensors."""
    gen = torch.Generator().manual_seed(0)
    trainer = {"embed": torch.randn(50, 8, generator=gen), "w1": torch.randn(8, 8, generator=gen),
               "norm": torch.randn(8, generator=gen), "w2": torch.randn(3, 8, generator=gen)}
    engine = {n: torch.zeros(t.shape, dtype=torch.bfloat16) for n, t in trainer.items()}
    # 800, 128, 16, 48 bytes at offsets 0, 1024, 1280, 1536: four buckets of 512, the embedding across two
    plan = SyncPlan.build(whole_tensor_regions(engine.items()), bucket_bytes=512)
    assert [r.offset for r in plan.regions] == [0, 1024, 1280, 1536] and len(plan.buckets) == 4
    pub = Publisher(lambda: iter(trainer.items()), {n: t.shape for n, t in trainer.items()},
                    None if streamed else trainer, 0, torch.device("cpu"))
    pub.set_plan(plan)
    recv = Receiver(plan, 0, "cpu", engine)
    _run_group(pub, [recv], publishes=1)
    for n, t in trainer.items():
        assert torch.equal(engine[n], t.to(torch.bfloat16)), n
    assert fingerprint(engine.values()) == fingerprint(trainer.values(), torch.bfloat16)
    # a second publish after an update: the same buffers, the new values
    with torch.no_grad():
        trainer["w1"].add_(1.0)
    _run_group(pub, [recv], publishes=1)
    assert torch.equal(engine["w1"], trainer["w1"].to(torch.bfloat16))


# ---- vLLM's layout rules against vLLM's own loaders ----------------------------------------
H, HEAD, HEADS, KV_HEADS, INTER, VOCAB = 64, 16, 4, 1, 96, 1000  # VOCAB pads to 1024


@contextmanager
def _tp(rank: int, size: int):
    """vLLM layers built as tensor-parallel rank `rank` of `size` (they read it at construction)."""
    patches = []
    for name in ("vllm.model_executor.layers.linear", "vllm.model_executor.layers.vocab_parallel_embedding",
                 "vllm.model_executor.parameter"):
        mod = importlib.import_module(name)
        for fn, value in (("get_tensor_model_parallel_rank", rank), ("get_tensor_model_parallel_world_size", size)):
            if hasattr(mod, fn):
                patches.append(mock.patch.object(mod, fn, lambda v=value: v))
    for p in patches:
        p.start()
    try:
        yield
    finally:
        for p in patches:
            p.stop()


def _toy_vllm_model(rank: int, size: int) -> torch.nn.Module:
    """A one-layer Llama/Qwen2 built from vLLM's parallel layers (qkv bias, GQA with fewer kv heads than
    ranks, a padded vocabulary, an untied LM head), parameters zeroed."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    class Toy(torch.nn.Module):
        packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    with _tp(rank, size), set_current_vllm_config(VllmConfig()):
        m = Toy()
        m.embed_tokens = VocabParallelEmbedding(VOCAB, H)
        m.self_attn = torch.nn.Module()
        m.self_attn.qkv_proj = QKVParallelLinear(H, HEAD, HEADS, KV_HEADS, bias=True)
        m.self_attn.o_proj = RowParallelLinear(HEADS * HEAD, H, bias=False)
        m.mlp = torch.nn.Module()
        m.mlp.gate_up_proj = MergedColumnParallelLinear(H, [INTER, INTER], bias=False)
        m.mlp.down_proj = RowParallelLinear(INTER, H, bias=False)
        m.norm = RMSNorm(H)
        m.lm_head = ParallelLMHead(VOCAB, H)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    return m


def _checkpoint() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    shapes = {"embed_tokens.weight": (VOCAB, H), "self_attn.q_proj.weight": (HEADS * HEAD, H),
              "self_attn.k_proj.weight": (KV_HEADS * HEAD, H), "self_attn.v_proj.weight": (KV_HEADS * HEAD, H),
              "self_attn.q_proj.bias": (HEADS * HEAD,), "self_attn.k_proj.bias": (KV_HEADS * HEAD,),
              "self_attn.v_proj.bias": (KV_HEADS * HEAD,), "self_attn.o_proj.weight": (H, HEADS * HEAD),
              "mlp.gate_proj.weight": (INTER, H), "mlp.up_proj.weight": (INTER, H), "mlp.down_proj.weight": (H, INTER),
              "norm.weight": (H,), "lm_head.weight": (VOCAB, H)}
    return {n: torch.randn(s, generator=gen) for n, s in shapes.items()}


def _load_like_vllm(model: torch.nn.Module, ckpt: dict[str, torch.Tensor]) -> None:
    """What LlamaModel.load_weights does: stacked names go to the fused parameter with a shard id."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    stacked = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
               (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in ckpt.items():
            for fused, part, shard in stacked:
                if part in name:
                    p = params[name.replace(part, fused)]
                    p.weight_loader(p, w, shard)
                    break
            else:
                p = params[name]
                getattr(p, "weight_loader", default_weight_loader)(p, w)


@pytest.mark.vllm
@pytest.mark.parametrize("tp_size", [1, 2, 4])  # 4 ranks > 1 kv head: each kv head on several ranks
def test_vllm_rules_reproduce_vllm_loaders_for_every_tp_rank(tp_size):
    pytest.importorskip("vllm", exc_type=ImportError)
    from weight_sync.vllm_layout import regions_of

    ckpt = _checkpoint()
    oracles = [_toy_vllm_model(r, tp_size) for r in range(tp_size)]
    for o in oracles:
        _load_like_vllm(o, ckpt)
    engines = [_toy_vllm_model(r, tp_size) for r in range(tp_size)]
    plan = SyncPlan.build(merge_tp_regions([regions_of(e, r) for r, e in enumerate(engines)]), bucket_bytes=4096)
    assert {(r.param, r.tp_rank) for r in plan.regions} == {(n, r) for r in range(tp_size)
                                                           for n, _ in engines[r].named_parameters()}
    pub = Publisher(lambda: iter(ckpt.items()), {n: t.shape for n, t in ckpt.items()}, ckpt, 0, torch.device("cpu"))
    pub.set_plan(plan)
    receivers = [Receiver(plan, r, "cpu", dict(e.named_parameters())) for r, e in enumerate(engines)]
    _run_group(pub, receivers, publishes=1)
    for rank, (engine, oracle) in enumerate(zip(engines, oracles)):
        expected = dict(oracle.named_parameters())
        for name, p in engine.named_parameters():
            assert torch.equal(p, expected[name]), (name, rank)  # vocabulary padding rows: 0 in both
