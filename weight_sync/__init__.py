"""Weight movement from the trainer to every engine worker (docs/design.md section 6).

A publish moves one flat buffer, laid out once for the engine at setup:

* **The plan** (`plan.py`, `SyncPlan`). For every parameter an engine worker holds (the engine's own
  names and layouts: vLLM's fused `qkv_proj` and `gate_up_proj`, the vocabulary rows of a padded
  embedding, the shard of each tensor-parallel rank) the engine says which trainer tensors and which
  slices of them fill it, and in which dtype (`Region`, `Piece`). The plan lays the regions out end to
  end in one flat byte buffer (each 256-byte aligned) and cuts that into buckets of `bucket_bytes`.
* **The trainer** (`send.py`, `Publisher`) keeps that flat buffer, casts and fuses its tensors into
  views of it, and broadcasts it bucket by bucket.
* **The engine** (`receive.py`, `Receiver`) receives each bucket into a persistent receive buffer and
  copies it into its parameters' storage through views computed once, one `torch._foreach_copy_` per
  bucket. Inside vLLM this runs in every worker process (`vllm_ext.py`), and the regions come from
  vLLM's own parameter layout (`vllm_layout.py`).

One dedicated process group (`transport.py`) joins the trainer (rank 0, the broadcast root) and every
engine worker (ranks 1..R). It is built from its own TCPStore, so it lives beside whatever default
group a process already has (vLLM workers have one). The same code takes gloo on CPU and NCCL on GPU.
Colocated on one GPU, the engine opens the trainer's flat buffer once through a CUDA IPC handle and
each publish is a device-to-device copy.

What crosses processes is typed (`messages.py`): the plan and its regions, the group's address, the
trainer's and each engine's report of a publish. Between Ray actors they travel as they are; only
vLLM's own RPC, which carries plain values, sees them as lists and dicts.

This package imports neither the trainer nor the rollout side: both build on it.
"""
