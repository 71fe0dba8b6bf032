"""The trainer's GPU paths: FlashAttention variable-length attention on packed rows, FSDP2 mixed precision
on one GPU, chunked log-probs in bf16, against the padded autocast path. Run on a GPU machine:

    python -m pytest -q -m gpu tests/gpu
"""

import pytest
import torch

from rollout.trajectory import Trajectory
from tests.conftest import compose



def test_varlen_attention_matches_causal_attention_per_sequence():
    import torch.nn.functional as F

    from trainer.packing import _VARLEN, packed_attention

    assert _VARLEN is not None, "torch.nn.attention.varlen is missing: the packed path would fall back to a loop"
    g = torch.Generator(device="cuda").manual_seed(0)
    bounds = [0, 5, 133, 140, 400]
    T, H, Hkv, D = bounds[-1], 8, 2, 64  # grouped-query attention, as Qwen2
    q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    out, _ = packed_attention(None, q, k, v, None, scaling=D**-0.5, tether_bounds=bounds, cu_seq_lens_q=cu,
                              max_length_q=max(b - a for a, b in zip(bounds, bounds[1:])))
    ref = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                    enable_gqa=True) for a, b in zip(bounds, bounds[1:])], dim=2)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=2e-2, atol=2e-2)


def _batch():
    g = torch.Generator().manual_seed(5)
    trajs = []
    for group, lengths in enumerate(([3, 60, 200], [17, 1, 90])):
        prompt = torch.randint(5, 5000, (20 + 9 * group,), generator=g).tolist()
        for k, n in enumerate(lengths):
            resp = torch.randint(5, 5000, (n,), generator=g).tolist()
            trajs.append(Trajectory(f"{group}-{k}", group, str(group), prompt, resp, [-9.0] * n, [0] * n, 0,
                                    reward=float(k == group)))
    return trajs


def test_packed_bf16_fsdp_step_matches_the_padded_autocast_step(tmp_path, gpu_model_dir):
    """Same batch, one GPU: the packed path (FSDP2 mixed precision on a one-rank group, varlen attention,
    chunked log-probs) and the padded path (autocast, full logits) agree to bf16 precision."""
    import torch.distributed as dist

    from trainer.packing import per_trajectory
    from trainer.worker import TrainerWorker
    from weight_sync.messages import GroupAddress
    from weight_sync.transport import free_address

    model_dir = gpu_model_dir
    common = ["model=hf", f"model.path={model_dir}", "model.dtype=bfloat16", "trainer.batch_size=6", "trainer.group_size=3",
              "trainer.lr=1e-5", f"output_dir={tmp_path}"]
    packed = TrainerWorker(compose([*common, "trainer.max_tokens_per_micro_batch=256"], cluster_gpus=1), model_dir)
    assert packed.uses_group()
    host, port = free_address()
    packed.init_group(GroupAddress(host, port, 1, "nccl", 300.0))
    padded = TrainerWorker(compose([*common, "trainer.pack_sequences=false", "trainer.fsdp=false"], cluster_gpus=1), model_dir)
    batch = _batch()
    values = []
    for t in (packed, padded):
        tb = t.step.tensors(batch)
        with torch.no_grad():
            values.append(per_trajectory(t.step.logprobs(tb)[0], batch, tb))
    for a, b in zip(*values):
        # summed over up to 40 tokens; bf16 rounding of the two paths (varlen + FSDP2 mixed precision, SDPA +
        # autocast) was seen 1.5% apart on one sequence on an H200
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0.03, atol=0.1)
    metrics, peaks = [], []
    for t in (packed, padded):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        metrics.append(t.train_step(batch))
        peaks.append(torch.cuda.max_memory_allocated() - before)  # what the step itself allocated at most
    m_packed, m_padded = metrics
    assert m_packed["train/padding_frac"] == 0.0 and m_padded["train/padding_frac"] > 0.3
    assert m_packed["policy/grad_norm"] == pytest.approx(m_padded["policy/grad_norm"], rel=0.05)
    assert peaks[0] < peaks[1]  # no (tokens, V) float32 logits
    dist.destroy_process_group()  # the one-rank FSDP group of this process
