"""Fallback engine on transformers `generate`, for machines without vLLM.

One request runs at a time (generate is not batched across requests here), so it is far
slower than vLLM; it exists so the whole pipeline runs anywhere transformers does.
Log-probs are taken from the processed scores (after temperature), i.e. the distribution
actually sampled from.
"""

from __future__ import annotations

import asyncio
import threading

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from rollout.engine import Engine, SamplingSpec, Segment
from weight_sync.messages import GroupAddress
from weight_sync.plan import Region, SyncPlan, whole_tensor_regions
from weight_sync.receive import Receiver, fingerprint
from weight_sync.transport import make_group, open_ipc, warm_up


class _AbortFlag(StoppingCriteria):
    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class HFEngine(Engine):
    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu", torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.eos_token_id = self.model.config.eos_token_id
        self._lock = threading.Lock()  # one generate at a time: the model is shared
        self._flags: dict[str, _AbortFlag] = {}
        self._group = None
        self._recv: Receiver | None = None

    def _generate_blocking(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec, flag: _AbortFlag) -> Segment:
        with self._lock:
            if flag.event.is_set():
                return Segment([], [], "abort")
            if spec.seed is not None:
                torch.manual_seed(spec.seed)
            greedy = spec.temperature == 0
            gen_cfg = GenerationConfig(
                do_sample=not greedy,
                temperature=None if greedy else spec.temperature,
                top_p=None if greedy else spec.top_p,
                top_k=None,
                max_new_tokens=spec.max_tokens,
                min_new_tokens=spec.max_tokens if spec.ignore_eos else spec.min_tokens,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.eos_token_id,
            )
            inputs = torch.tensor([prompt_ids], device=self.device)
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=inputs,
                    attention_mask=torch.ones_like(inputs),
                    generation_config=gen_cfg,
                    stopping_criteria=StoppingCriteriaList([flag]),
                    output_scores=True,
                    return_dict_in_generate=True,
                )
        tokens = out.sequences[0, len(prompt_ids):].tolist()
        logprobs = [
            torch.log_softmax(score[0].float(), dim=-1)[tok].item() for score, tok in zip(out.scores, tokens)
        ]
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        if tokens and tokens[-1] in eos and not spec.ignore_eos:
            reason = "stop"
        elif flag.event.is_set():
            reason = "abort"
        else:
            reason = "length"
        return Segment(tokens, logprobs, reason)

    async def generate(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> Segment:
        flag = _AbortFlag()
        self._flags[request_id] = flag
        try:
            return await asyncio.to_thread(self._generate_blocking, request_id, prompt_ids, spec, flag)
        finally:
            self._flags.pop(request_id, None)

    async def abort_all(self) -> int:
        flags = list(self._flags.values())
        for flag in flags:
            flag.event.set()
        return len(flags)

    async def weight_sync_regions(self) -> list[Region]:
        # the trainer's own model class: every tensor as it is, under the same name
        return whole_tensor_regions(self.model.named_parameters())

    def _receiver(self, plan: SyncPlan, device: torch.device) -> Receiver:
        return Receiver(plan, 0, device, dict(self.model.named_parameters()))

    def _join_blocking(self, plan: SyncPlan, address: GroupAddress, rank: int) -> None:
        device = self.device if address.backend == "nccl" else torch.device("cpu")
        self._recv = self._receiver(plan, device)
        self._group = make_group(address, rank)
        warm_up(self._group, device)

    async def init_weight_sync(self, plan: SyncPlan, address: GroupAddress, rank: int) -> None:
        await asyncio.to_thread(self._join_blocking, plan, address, rank)

    async def init_weight_sync_ipc(self, plan: SyncPlan, handle: bytes) -> None:
        self._recv = self._receiver(plan, self.device)
        self._recv.attach_ipc(open_ipc(handle))
        self._group = None

    def _receive_blocking(self) -> None:
        with torch.no_grad():
            if self._group is None:
                self._recv.copy_ipc()
            else:
                self._recv.receive(self._group)

    async def receive_weights(self) -> None:
        if self._recv is None:
            raise RuntimeError("receive_weights before init_weight_sync: the engine has not joined the weight sync")
        await asyncio.to_thread(self._receive_blocking)

    async def weights_fingerprint(self) -> str:
        return fingerprint(p for p in self.model.parameters())

    async def close(self) -> None:
        await self.abort_all()
        self._group = None
