"""fp32 linear layers through oneDNN (fedrank.models.onednn): the same products as nn.Linear to float rounding,
forward and backward, and a model swapped to it trains and evaluates as before."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from fedrank.data.examples import Example
from fedrank.data.tokenize import collate, encode
from fedrank.models import LoraHost, tiny_llama, use_onednn
from fedrank.models.onednn import OneDNNLinear, available, uses_onednn
from fedrank.train import batch_loss
from fedrank.types import ClientAssignment, LoraFactors

pytestmark = pytest.mark.skipif(not available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 64), (2, 0, 64)])
@pytest.mark.parametrize("train_weight", [False, True])
def test_linear_matches_nn_linear_forward_and_backward(bias: bool, shape: tuple[int, ...], train_weight: bool) -> None:
    torch.manual_seed(0)
    ref = nn.Linear(64, 48, bias=bias)
    ref.weight.requires_grad_(train_weight)
    fast = copy.deepcopy(ref)
    assert use_onednn(fast) == 1 and type(fast) is OneDNNLinear
    x = torch.randn(*shape) * 3
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fast(xf)
    assert yf.shape == yr.shape
    torch.testing.assert_close(yf, yr, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-5, atol=1e-5)
    if train_weight:
        torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-4)
    else:
        assert fast.weight.grad is None
    if bias:
        torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_no_grad_and_other_dtypes() -> None:
    torch.manual_seed(1)
    ref = nn.Linear(32, 16)
    fast = copy.deepcopy(ref)
    use_onednn(fast)
    x = torch.randn(32, 4, 3).permute(2, 1, 0)  # (3, 4, 32), not contiguous
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    # float64 takes nn.Linear's own route: bit for bit
    ref64, fast64 = ref.double(), fast.double()
    x64 = torch.randn(5, 32, dtype=torch.float64)
    assert torch.equal(fast64(x64), ref64(x64))


def test_swap_keeps_weights_and_ties_and_swaps_back() -> None:
    lm = tiny_llama(seed=0)
    model = lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert n_linear > 0
    assert use_onednn(model) == n_linear and uses_onednn(model)
    assert not any(type(m) is nn.Linear for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert use_onednn(model, on=False) == n_linear and not uses_onednn(model)


def test_a_swapped_model_has_the_same_loss_gradients_and_lora_layers() -> None:
    """The tiny Llama with LoRA: loss and LoRA gradients of a batch equal nn.Linear's to float rounding, and
    the adapters LoraHost creates on a swapped base are swapped too."""
    plain = tiny_llama(seed=0)
    fast = tiny_llama(seed=0)
    use_onednn(fast.model)
    tok = plain.tokenizer
    data = [encode(tok, Example("say " + "word " * k, "ans " * (k % 3 + 1)), 96) for k in (1, 7, 3, 12)]
    batch = collate(data, tok.pad_token_id)
    g = torch.Generator().manual_seed(3)
    hosts = [LoraHost(plain.model), LoraHost(fast.model)]
    factors = None
    results = []
    for host in hosts:
        if factors is None:
            factors = {
                k: LoraFactors(torch.randn(m, 4, generator=g) * 0.05, torch.randn(4, n, generator=g) * 0.05)
                for k, (m, n) in host.shapes.items()
            }
        host.load(ClientAssignment(0, 4, 2.0, factors, 0))
        loss = batch_loss(host.module, batch)
        results.append((loss.detach(), torch.autograd.grad(loss, host.trainable_parameters())))
    lora = [
        [m for name, m in h.module.named_modules() if name.endswith(("lora_A.rank4", "lora_B.rank4"))] for h in hosts
    ]
    assert lora[0] and all(type(m) is nn.Linear for m in lora[0])
    assert len(lora[1]) == len(lora[0]) and all(type(m) is OneDNNLinear for m in lora[1])
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for gf, gp in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(gf, gp, rtol=1e-4, atol=1e-6)


GROWTH = """
import sys
import torch
from torch import nn
from fedrank.models import use_onednn

def anon_mb():
    line = next(x for x in open("/proc/self/status") if x.startswith("RssAnon"))
    return int(line.split()[1]) / 1024

lin = nn.Linear(576, 1536, bias=False)
use_onednn(lin)
with torch.no_grad():
    for m in range(8, 136):  # fill the caches
        lin(torch.randn(m, 576))
    before = anon_mb()
    for m in range(1000, 1400):
        lin(torch.randn(m, 576))
print(anon_mb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status")
def test_kernel_caches_stay_bounded_over_many_input_shapes() -> None:
    """oneDNN keeps a prepared kernel per input shape; packed batches bring a new shape almost every step.
    fedrank bounds its caches (fedrank.models.onednn.CACHE_CAPACITY); with the 1024-entry defaults 400 shapes
    of one layer add hundreds of MB. Measured in fresh processes: in this one, what earlier tests allocated
    moves glibc's mmap threshold, and then the growing outputs themselves fragment the heap."""
    import os
    import subprocess
    import sys

    def grown(**env: str) -> float:
        run = subprocess.run(
            [sys.executable, "-c", GROWTH],
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return float(run.stdout.strip().splitlines()[-1])

    bounded = grown()
    defaults = grown(LRU_CACHE_CAPACITY="1024", ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024")
    assert bounded < 80, f"resident memory grew by {bounded:.0f} MB over 400 input shapes"
    assert defaults > 3 * max(bounded, 50), f"with oneDNN's default caches: {defaults:.0f} MB"
