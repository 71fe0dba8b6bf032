"""The merged weights keep the base model's parameter order, biases included."""

import torch

from trainer.lora import merge


def test_merge_folds_adapters_and_keeps_the_order():
    W, b, A, B, n = torch.ones(3, 2), torch.zeros(3), torch.ones(1, 2), 2 * torch.ones(3, 1), torch.ones(2)
    p = "base_model.model.layer.q_proj."
    named = [(p + "base_layer.weight", W), (p + "base_layer.bias", b), (p + "lora_A.default.weight", A),
             (p + "lora_B.default.weight", B), ("base_model.model.layer.norm.weight", n)]
    out = list(merge(named, {"layer.q_proj": 0.5}))
    assert [name for name, _ in out] == ["layer.q_proj.weight", "layer.q_proj.bias", "layer.norm.weight"]
    torch.testing.assert_close(out[0][1], W + 0.5 * B @ A)
    assert out[1][1] is b and out[2][1] is n
