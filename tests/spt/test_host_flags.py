"""host_flag: the hot path's branches on buffers are answered on the host, and never from a stale buffer."""

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from spt_kernels import ProductQuantizer
from spt_kernels.host_flags import host_flag
from spt_kernels.routed_mlp import RoutedMLP


def counting(fn):
    calls = []

    def wrapped(tensor):
        calls.append(1)
        return fn(tensor)

    return wrapped, calls


def test_recomputed_only_after_an_in_place_write_or_a_replaced_buffer():
    module = torch.nn.Module()
    module.register_buffer("flag", torch.tensor(False))
    compute, calls = counting(bool)
    assert [host_flag(module, "flag", compute) for _ in range(3)] == [False] * 3 and len(calls) == 1
    module.flag.fill_(True)  # what initialize / calibrate / checkpoint loading do
    assert host_flag(module, "flag", compute) is True and len(calls) == 2
    module.load_state_dict({"flag": torch.tensor(False)})
    assert host_flag(module, "flag", compute) is False and len(calls) == 3
    module.flag = torch.tensor(True)  # replaced, as .to(other device) does
    assert host_flag(module, "flag", compute) is True and len(calls) == 4
    with torch.inference_mode():
        module.flag = torch.tensor(False)  # an inference tensor keeps no version: answered fresh every time
    assert host_flag(module, "flag", compute) is False and host_flag(module, "flag", compute) is False
    assert len(calls) == 6


def test_routed_mlp_checks_its_unit_order_once_and_follows_a_regrouping(monkeypatch):
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2)
    mlp = RoutedMLP(LlamaMLP(config), n_blocks=4, active_blocks=2, router_init_std=0.02, backend="reference")
    x = torch.randn(5, 16)
    equal_calls = []
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: equal_calls.append(1) or real_equal(a, b))
    for _ in range(3):
        mlp(x)
    assert len(equal_calls) == 1
    order = torch.randperm(32)
    mlp.unit_order.copy_(order)
    w_gate, _, w_down = mlp.block_ordered_weights()
    torch.testing.assert_close(w_gate, mlp.gate_proj.weight[order])
    torch.testing.assert_close(w_down, mlp.down_proj.weight[:, order])
    assert len(equal_calls) == 2


def test_a_loaded_codebook_counts_as_initialised():
    trained = ProductQuantizer(head_dim=16, subspace_dim=8, codewords=4)
    trained.initialize(torch.randn(40, 16))
    fresh = ProductQuantizer(head_dim=16, subspace_dim=8, codewords=4)
    assert not fresh.is_initialized
    fresh.load_state_dict(trained.state_dict())
    assert fresh.is_initialized
    fresh.encode(torch.randn(7, 16) + 100.0)  # other data must not re-initialise a loaded codebook
    torch.testing.assert_close(fresh.codebook, trained.codebook)
