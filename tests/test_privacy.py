"""Client-level DP (fedrank.privacy): clipping, noise on the per-index sum, the sensitivity bound of every
method with a mechanism, and the engine (bit-identical at C = ∞, σ = 0; the accountant's ε; the budget)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrank.aggregation import make_method
from fedrank.aggregation.base import derive_generator
from fedrank.config import ConfigError, PrivacyConfig, load_config
from fedrank.privacy import (
    EVERY_INDEX,
    JOINT,
    PRODUCT_SPACE,
    add_noise_to_sum,
    clip_joint,
    clip_product,
    clip_update,
    delta_norm,
    dense_noise,
    index_noise,
    joint_norms,
    privatize,
    product_norm,
    product_sum,
)
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors

SHAPES = {"a": (6, 5), "b": (4, 7)}
R = 4


def method(name: str) -> Any:
    options: dict[str, Any] = {"fslora": {"rank": R}, "hetlora": {"sparsity_weights": False}}.get(name, {})
    return make_method(name, alpha=8.0, seed=3, **options)


def round_of(name: str, ranks: list[int], seed: int) -> tuple[Any, Any, list[ClientAssignment], list[ClientUpdate]]:
    """A global state after one plain round (so B is nonzero), the next round's dispatches, and trained
    updates: each trained factor moved by a random amount."""
    m = method(name)
    state = m.init_state(SHAPES, R)
    g = torch.Generator().manual_seed(seed)
    for step in range(2):
        sent = [m.dispatch(state, ClientSpec(k, r, 10), step) for k, r in enumerate(ranks)]
        updates = []
        for a in sent:
            factors = {}
            for layer, f in a.factors.items():
                B = f.B + torch.randn(f.B.shape, generator=g) * 0.3 if a.train_B else f.B
                A = f.A + torch.randn(f.A.shape, generator=g) * 0.3 if a.train_A else f.A
                factors[layer] = LoraFactors(B, A)
            updates.append(
                ClientUpdate(a.client_id, a.rank, 10, factors, indices=a.indices, train_A=a.train_A, train_B=a.train_B)
            )
        if step == 0:
            state = m.aggregate(state, updates, [1.0] * len(updates))
    return m, state, sent, updates


def flat(state: Any) -> torch.Tensor:
    """The state's factors, or FlexLoRA's ΔW itself (its stacked factors multiplied out), as one vector."""
    if getattr(state, "svd", None) is not None and getattr(state, "delta", None) is None:  # raFLoRA: ΔW's SVD
        return torch.cat([((f.U * f.S) @ f.Vh).flatten() for _, f in sorted(state.svd.items())])
    if hasattr(state, "delta"):
        return torch.cat([(f.B @ f.A).flatten() for _, f in sorted(state.delta.items())])
    if hasattr(state, "merged"):  # FLoRA: the dense merged delta
        return torch.cat([d.flatten() for _, d in sorted(state.merged.items())])
    return torch.cat([torch.cat([f.B.flatten(), f.A.flatten()]) for _, f in sorted(state.factors.items())])


def private(m: Any, updates: list[ClientUpdate], sent: list[ClientAssignment], clip: float) -> list[ClientUpdate]:
    """The round's updates clipped in the method's space, without noise (as the engine does)."""
    if m.name in JOINT:
        return [clip_joint(u, s, clip).update for u, s in zip(updates, sent, strict=True)]
    if m.name in PRODUCT_SPACE:
        ranks = [u.rank for u in updates]
        return [clip_product(u, m.scaling(u.rank), clip, m.dp_pieces(u.rank, ranks)).update for u in updates]
    return privatize(updates, [m.dp_reference(s) for s in sent], clip, 0.0, derive_generator(0))[0]


RANKS = {
    "fedit": [4, 4, 4],
    "ffa": [2, 4, 3],
    "fedsa": [2, 4, 3],
    "hetlora": [2, 4, 3],
    "fslora": [2, 4, 3],
    "flexlora": [2, 4, 3],
    "replication": [2, 4, 3],
    "rolora": [2, 4, 3],
    "fedplora": [2, 4, 3],
    "flora": [2, 4, 3],
    "raflora": [2, 4, 3],
    "fedex": [2, 4, 3],
    "lorafair": [4, 4, 4],
}
INDEXED = ["fedit", "ffa", "fedsa", "hetlora", "fslora", "replication", "rolora", "fedplora"]
"""The methods whose mechanism is the per-index one (noise carried by each index's first holder)."""


def test_clipping_scales_the_delta_to_the_clip_and_leaves_small_updates_untouched() -> None:
    _, _, sent, updates = round_of("fedit", [4, 4], 0)
    norm = delta_norm(updates[0], sent[0])
    small = clip_update(updates[0], sent[0], norm * 1.01)
    assert small.factor == 1.0 and small.update is updates[0]  # bit for bit: no s + (u - s) rounding
    c = clip_update(updates[0], sent[0], norm / 4)
    assert c.factor == pytest.approx(0.25) and delta_norm(c.update, sent[0]) == pytest.approx(norm / 4, rel=1e-5)
    for layer, f in c.update.factors.items():  # the same direction, a quarter of the length
        s, u = sent[0].factors[layer], updates[0].factors[layer]
        torch.testing.assert_close(f.B - s.B, (u.B - s.B) / 4)


def test_ffa_clips_only_b_its_a_is_frozen() -> None:
    _, _, sent, updates = round_of("ffa", [2, 4], 1)
    c = clip_update(updates[1], sent[1], 1e-3)
    assert delta_norm(c.update, sent[1]) == pytest.approx(1e-3, rel=1e-4)
    for layer, f in c.update.factors.items():
        assert torch.equal(f.A, sent[1].factors[layer].A)


@pytest.mark.parametrize("name", [n for n in INDEXED if n not in EVERY_INDEX])
def test_noise_rides_once_on_each_index_sum(name: str) -> None:
    """Zero deltas and noise std 1: the aggregate minus the noiseless one is, per index, N(0, 1) divided by the
    count the method divides that index's sum by (K, or its holders), and each draw appears once."""
    m, state, sent, _ = round_of(name, RANKS[name], 2)
    still = [
        ClientUpdate(a.client_id, a.rank, 10, dict(a.factors), indices=a.indices, train_A=a.train_A, train_B=a.train_B)
        for a in sent
    ]
    noisy = add_noise_to_sum(still, 1.0, derive_generator(5))
    noised = 0
    for u, s in zip(noisy, still, strict=True):
        for layer, f in u.factors.items():
            noised += int((f.B != s.factors[layer].B).sum() + (f.A != s.factors[layer].A).sum())
    held = {i for u in still for i in (u.indices.tolist() if u.indices is not None else range(u.rank))}
    a = sent[0]
    per_index = sum(rows * a.train_B + cols * a.train_A for rows, cols in SHAPES.values())  # B's m, A's n
    assert noised == len(held) * per_index  # every held index's column of B (and row of A) once
    diff = flat(m.aggregate(state, noisy, [1.0] * len(still))) - flat(m.aggregate(state, still, [1.0] * len(still)))
    assert diff.abs().max() > 0


def test_the_noise_has_standard_deviation_sigma_c_over_k() -> None:
    """FedIT over K = 4 clients, σ = 0.5, C = 2: the aggregate's noise has std σC/K = 0.25 (on the sum: σC)."""
    big = {"w": (400, 300)}
    m = make_method("fedit", alpha=8.0, seed=0)
    state = m.init_state(big, 8)
    sent = [m.dispatch(state, ClientSpec(k, 8, 1), 0) for k in range(4)]
    updates = [ClientUpdate(a.client_id, 8, 1, dict(a.factors)) for a in sent]
    noisy, _ = privatize(updates, sent, 2.0, 0.5, derive_generator(9))
    diff = flat(m.aggregate(state, noisy, [1.0] * 4)) - flat(m.aggregate(state, updates, [1.0] * 4))
    assert diff.numel() == 8 * 700 and diff.std().item() == pytest.approx(0.25, rel=0.03)
    assert diff.mean().item() == pytest.approx(0.0, abs=0.01)


def released(m: Any, state: Any, updates: list[ClientUpdate], sent: list[ClientAssignment]) -> torch.Tensor:
    """What a method's state is computed from: the state itself, or for the JOINT methods (FedEx-LoRA,
    LoRA-FAIR: post-processing of sums) the means of the padded factor changes and of the products."""
    if m.name not in JOINT:
        return flat(m.aggregate(state, updates, [1.0] * len(updates)))
    K, parts = len(updates), []
    for name, g in sorted(state.factors.items()):
        dB, dA = torch.zeros_like(g.B, dtype=torch.float64), torch.zeros_like(g.A, dtype=torch.float64)
        for u, a in zip(updates, sent, strict=True):
            dB[:, : u.rank] += u.factors[name].B.double() - a.factors[name].B.double()
            dA[: u.rank] += u.factors[name].A.double() - a.factors[name].A.double()
        parts += [dB.flatten() / K, dA.flatten() / K]
    parts += [v.flatten() / K for _, v in sorted(product_sum(updates, sent).items())]
    return torch.cat(parts)


@pytest.mark.parametrize("name", [*INDEXED, *PRODUCT_SPACE, *JOINT])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), which=st.integers(0, 2), scale=st.floats(1e-3, 1e3), clip=st.floats(0.01, 10))
def test_one_client_moves_the_aggregate_by_at_most_the_stated_sensitivity(
    name: str, seed: int, which: int, scale: float, clip: float
) -> None:
    """Replace one client's update by an arbitrary one: after clipping, the pre-noise aggregate moves by at most
    the method's stated replace-one sensitivity (fedrank.privacy.sensitivity)."""
    from fedrank.privacy import sensitivity

    m, state, sent, updates = round_of(name, RANKS[name], seed)
    g = torch.Generator().manual_seed(seed + 1)
    other = updates[which]
    wild = {
        layer: LoraFactors(
            f.B + scale * torch.randn(f.B.shape, generator=g) if other.train_B else f.B,
            f.A + scale * torch.randn(f.A.shape, generator=g) if other.train_A else f.A,
        )
        for layer, f in other.factors.items()
    }
    changed = [*updates[:which], ClientUpdate(**{**other.__dict__, "factors": wild}), *updates[which + 1 :]]
    a, b = private(m, updates, sent, clip), private(m, changed, sent, clip)
    moved = (released(m, state, a, sent) - released(m, state, b, sent)).norm().item()
    bound = sensitivity(m, [u.spec for u in updates], [s.indices for s in sent], which, clip)
    assert moved <= bound * (1 + 1e-4) + 1e-6


def test_privacy_config_refuses_what_it_cannot_protect(tmp_path: Path) -> None:
    from helpers import tiny_toml

    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_toml())
    on = ["privacy.clip=1.0", "privacy.noise_multiplier=1.0"]
    with pytest.raises(ConfigError, match='weighting = "uniform"'):
        load_config(cfg, [*on, "method.name=fedit"])
    with pytest.raises(ConfigError, match=r"hetlora needs method.options = \{sparsity_weights = false\}"):
        load_config(cfg, [*on, "method.name=hetlora", "federation.weighting=uniform"])
    with pytest.raises(ConfigError, match="give privacy.noise_multiplier or a target privacy.epsilon"):
        PrivacyConfig(clip=1.0)
    with pytest.raises(ConfigError, match="privacy.clip = inf bounds nothing"):
        PrivacyConfig(clip=math.inf, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="privacy.clip = inf bounds nothing"):
        PrivacyConfig(clip=math.inf, epsilon=8.0)
    with pytest.raises(ConfigError, match="drop federation.max_update_norm"):
        load_config(cfg, [*on, "method.name=ffa", "federation.weighting=uniform", "federation.max_update_norm=1"])
    with pytest.raises(ConfigError, match="privacy.sampling 'random' is unknown"):
        PrivacyConfig(clip=1.0, noise_multiplier=1.0, sampling="random")
    assert not PrivacyConfig().enabled and PrivacyConfig(clip=math.inf).enabled


@pytest.mark.parametrize("name", [*INDEXED, *PRODUCT_SPACE])
def test_the_stated_sensitivity_is_reached(name: str) -> None:
    """The bound is tight: a client whose clipped delta flips to the opposite direction moves the aggregate by
    exactly the stated sensitivity (so a smaller stated bound would be wrong). Client 0 holds indices every
    client holds (Fed-PLoRA: every client at the global rank, so its random modules are all of them)."""
    from fedrank.privacy import sensitivity

    m, state, sent, updates = round_of(name, [4, 4, 4] if name in ("fedplora", "raflora") else RANKS[name], 4)
    which, s, u = 0, sent[0], updates[0]  # (ffa: client 0 holds columns every client holds)
    s = s if name in PRODUCT_SPACE else m.dp_reference(s)  # (fedsa: B measured from zero)
    flipped = {
        layer: LoraFactors(
            s.factors[layer].B - 100 * (f.B - s.factors[layer].B),
            s.factors[layer].A - 100 * (f.A - s.factors[layer].A) if u.train_A else f.A,
        )
        for layer, f in u.factors.items()
    }
    if name in PRODUCT_SPACE:  # its contribution is the whole ΔW_k: the opposite one is -B_k A_k
        flipped = {layer: LoraFactors(-f.B, f.A) for layer, f in u.factors.items()}
    changed = [*updates[:which], ClientUpdate(**{**u.__dict__, "factors": flipped}), *updates[which + 1 :]]
    a, b = private(m, updates, sent, 0.05), private(m, changed, sent, 0.05)
    ones = [1.0] * len(updates)
    moved = (flat(m.aggregate(state, a, ones)) - flat(m.aggregate(state, b, ones))).norm().item()
    bound = sensitivity(m, [x.spec for x in updates], [x.indices for x in sent], which, 0.05)
    assert moved == pytest.approx(bound, rel=1e-4)


# ------------------------------------------------------------------------------------------------ the engine


def engine_config(tmp_path: Path, method_name: str, *overrides: str) -> Any:
    from helpers import tiny_toml

    path = tmp_path / "tiny.toml"
    path.write_text(tiny_toml())
    base = [f"method.name={method_name}", "federation.weighting=uniform", "federation.clients_per_round=3"]
    if method_name == "fslora":
        base.append("method.options={rank = 4}")
    if method_name in ("fedit", "lorafair"):
        base.append("ranks.distribution=fixed")
    if method_name == "hetlora":
        base.append("method.options={sparsity_weights = false}")
    return load_config(path, [*base, *overrides])


def run(cfg: Any, out: Path) -> dict[str, Any]:
    import json

    from fedrank.simulation import Simulation

    Simulation(cfg, out, progress=False).run()
    return dict(json.loads((out / "summary.json").read_text()))


@pytest.mark.parametrize("name", [*INDEXED, *PRODUCT_SPACE, *JOINT])
def test_infinite_clip_and_no_noise_is_bit_identical_to_no_privacy(name: str, tmp_path: Path) -> None:
    from test_flower import records, same_state, untimed

    plain = engine_config(tmp_path, name)
    private = engine_config(tmp_path, name, "privacy.clip=inf")
    run(plain, tmp_path / "plain")
    summary = run(private, tmp_path / "private")
    assert same_state(tmp_path / "plain", tmp_path / "private")
    drop = ("epsilon", "dp_clipped", "dp_median_norm")
    theirs = [{k: v for k, v in r.items() if k not in drop} for r in untimed(records(tmp_path / "private"))]
    assert untimed(records(tmp_path / "plain")) == theirs
    assert summary["privacy"]["epsilon"] is None  # ∞, written as null: σ = 0 protects nothing


def test_a_private_run_reports_the_accountants_epsilon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """FedIT, C = 0.05, σ = 1.2, fixed sampling of 3 of 4 clients, 2 rounds: ε in the round records, the
    summary and the end-of-run table is what dp-accounting gives for that mechanism (computed here
    independently); every update was clipped."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    from fedrank.cli import _print_outputs
    from test_flower import records

    cfg = engine_config(tmp_path, "fedit", "privacy.clip=0.05", "privacy.noise_multiplier=1.2")
    summary = run(cfg, tmp_path / "run")
    delta = 1 / 4**1.1
    expect = []
    for t in (1, 2):
        acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        event = dp_accounting.SampledWithoutReplacementDpEvent(4, 3, dp_accounting.GaussianDpEvent(0.6))
        acc.compose(event, t)
        expect.append(acc.get_epsilon(delta))
    rounds = [r for r in records(tmp_path / "run") if r["type"] == "round"]
    assert [r["epsilon"] for r in rounds] == pytest.approx(expect, rel=1e-9)
    assert all(r["dp_clipped"] == 1.0 and r["dp_median_norm"] > 0.05 for r in rounds)
    dp = summary["privacy"]
    assert dp["epsilon"] == pytest.approx(expect[-1], rel=1e-9) and dp["delta"] == pytest.approx(delta)
    assert (dp["noise_multiplier"], dp["clip"], dp["rounds"], dp["sampling"]) == (1.2, 0.05, 2, "fixed")
    _print_outputs(summary, tmp_path / "run")
    out = capsys.readouterr().out
    assert f"privacy: ε = {expect[-1]:.3g} at δ = {delta:.2g} after 2 round(s) (RDP accountant, fixed sampling" in out


def test_resume_keeps_the_accountant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped after round 1 and resumed ends with the uninterrupted run's state and ε, bit for bit."""
    import json

    from fedrank.simulation import Simulation
    from test_flower import same_state

    cfg = engine_config(tmp_path, "fedit", "privacy.clip=0.05", "privacy.noise_multiplier=1.2", "privacy.seeded=true")
    whole = run(cfg, tmp_path / "whole")
    real = Simulation.aggregate_round

    def crash(self: Simulation, t: int, *args: Any) -> str:
        if t == 1:
            raise KeyboardInterrupt
        return real(self, t, *args)

    monkeypatch.setattr(Simulation, "aggregate_round", crash)
    with pytest.raises(KeyboardInterrupt):
        Simulation(cfg, tmp_path / "cut", progress=False).run()
    monkeypatch.setattr(Simulation, "aggregate_round", real)
    Simulation(cfg, tmp_path / "cut", resume=True, progress=False).run()
    resumed = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert resumed["privacy"] == whole["privacy"]
    assert same_state(tmp_path / "whole", tmp_path / "cut")


def test_a_run_stops_before_exceeding_its_budget(tmp_path: Path) -> None:
    from fedrank.simulation import Simulation
    from fedrank.validation import RunFailed

    probe = engine_config(tmp_path, "fedit", "privacy.clip=0.05", "privacy.noise_multiplier=1.2")
    one = run(probe, tmp_path / "probe")["privacy"]["epsilon"]  # ε after 2 rounds
    cfg = engine_config(
        tmp_path, "fedit", "privacy.clip=0.05", "privacy.noise_multiplier=1.2", f"privacy.epsilon={one * 0.999}"
    )
    with pytest.raises(RunFailed, match=r"privacy budget: round 2 would bring ε to .* > privacy.epsilon"):
        Simulation(cfg, tmp_path / "run", progress=False).run()


def test_a_target_epsilon_calibrates_the_noise_and_poisson_sampling_draws_independently(tmp_path: Path) -> None:
    cfg = engine_config(tmp_path, "fedit", "privacy.clip=0.1", "privacy.epsilon=8", "privacy.sampling=poisson")
    dp = run(cfg, tmp_path / "run")["privacy"]
    assert dp["epsilon"] <= 8 and dp["epsilon"] > 7.9 and dp["noise_multiplier"] > 0
    from fedrank.simulation import Simulation

    sim = Simulation(cfg, tmp_path / "other", progress=False)
    sizes = {len(sim.sample(t)) for t in range(40)}
    assert len(sizes) > 1 and max(sizes) <= 4  # the cohort's size varies: each client with rate q = 3/4


def test_flexlora_clips_the_whole_update_from_its_factors_and_adds_dense_noise() -> None:
    """‖s·B A‖_F from the factors equals the dense norm; clipping scales B; the noise is dense on Σ_k ΔW_k,
    so ΔW gains exactly N / K (full rank), and the state's SVD still reproduces it."""
    m, state, _, updates = round_of("flexlora", RANKS["flexlora"], 7)
    u = updates[1]
    s = m.scaling(u.rank)
    dense = torch.cat([(s * f.B @ f.A).flatten() for f in u.factors.values()]).norm().item()
    assert product_norm(u, s) == pytest.approx(dense, rel=1e-6)
    c = clip_product(u, s, dense / 3)
    assert c.factor == pytest.approx(1 / 3) and product_norm(c.update, s) == pytest.approx(dense / 3, rel=1e-6)
    noise = dense_noise(SHAPES, 0.7, derive_generator(1))
    ones = [1.0] * 3
    plain, noisy = m.aggregate(state, updates, ones), m.aggregate(state, updates, ones, noise=noise)
    for name, f in noisy.delta.items():
        g = plain.delta[name]
        torch.testing.assert_close(f.B @ f.A - g.B @ g.A, noise[name] / 3, rtol=1e-5, atol=1e-5)
        assert torch.linalg.matrix_rank(f.B @ f.A).item() == min(SHAPES[name])
        svd = noisy.svd[name]  # the top components dispatch reads: the best rank-4 approximation of the noisy ΔW
        best = torch.linalg.svdvals((f.B @ f.A).double())[:4]
        torch.testing.assert_close(svd.S[:4].double(), best, rtol=1e-4, atol=1e-5)


def test_a_run_from_before_privacy_existed_still_resumes(tmp_path: Path) -> None:
    """A checkpoint written before [privacy] existed has no such section: a resume takes it as privacy off (the
    default, what that version did), and a resume that turns privacy on is still refused."""
    from fedrank import run_dir
    from fedrank.config import to_dict

    cfg = engine_config(tmp_path, "fedit")
    old = to_dict(cfg)
    del old["privacy"]
    run_dir.check_resume_config(old, to_dict(cfg), tmp_path / "round-0001.safetensors")
    private = engine_config(tmp_path, "fedit", "privacy.clip=1.0", "privacy.noise_multiplier=1.0")
    with pytest.raises(ConfigError, match=r"privacy.clip \(0.0 -> 1.0\)"):
        run_dir.check_resume_config(old, to_dict(private), tmp_path / "round-0001.safetensors")


def test_the_noise_is_secret_unless_seeded(tmp_path: Path) -> None:
    """By default the noise (and the sample) come from the OS's entropy: two runs of one config differ and
    the run's seed does not regenerate them; privacy.seeded = true makes them reproducible (tests only)."""
    from test_flower import same_state

    private = ["privacy.clip=0.05", "privacy.noise_multiplier=1.2"]
    secret = engine_config(tmp_path, "fedit", *private)
    run(secret, tmp_path / "a")
    summary = run(secret, tmp_path / "b")
    assert not same_state(tmp_path / "a", tmp_path / "b") and summary["privacy"]["seeded"] is False
    seeded = engine_config(tmp_path, "fedit", *private, "privacy.seeded=true")
    run(seeded, tmp_path / "c")
    assert run(seeded, tmp_path / "d")["privacy"]["seeded"] is True
    assert same_state(tmp_path / "c", tmp_path / "d")


def test_a_failed_client_counts_as_no_change_under_dp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DP a client whose training fails still counts, with its update equal to what it was sent: the
    count the noise is divided by does not depend on any client's data, and the round is never skipped."""
    from fedrank.local import LocalTrainer
    from fedrank.train import ClientFailure
    from test_flower import records, same_state

    real = LocalTrainer.train

    def fail_client_1(self: LocalTrainer, a: ClientAssignment, data: Any, round_index: int) -> Any:
        if a.client_id == 1:
            raise ClientFailure("diverged")
        return real(self, a, data, round_index)

    private = ["federation.clients_per_round=4", "privacy.clip=0.05", "privacy.noise_multiplier=0.5"]
    monkeypatch.setattr(LocalTrainer, "train", fail_client_1)
    cfg = engine_config(tmp_path, "fedit", *private, "privacy.seeded=true")
    run(cfg, tmp_path / "run")
    recs = records(tmp_path / "run")
    assert [r["clients"] for r in recs if r["type"] == "round"] == [3, 3]  # the real updates
    assert {r["client"] for r in recs if r["type"] == "client_failed"} == {1}
    # the same as a run in which client 1 trained and sent back exactly what it was given
    monkeypatch.setattr(LocalTrainer, "train", real)

    def unchanged_1(self: LocalTrainer, a: ClientAssignment, data: Any, round_index: int) -> Any:
        update, stats = real(self, a, data, round_index)
        if a.client_id == 1:
            update = ClientUpdate(a.client_id, a.rank, update.num_examples, dict(a.factors))
        return update, stats

    monkeypatch.setattr(LocalTrainer, "train", unchanged_1)
    run(cfg, tmp_path / "same")
    assert same_state(tmp_path / "run", tmp_path / "same")


def _two_rounds_epsilon(sampled: int) -> float:
    """ε, computed independently with dp-accounting, of two rounds of ``sampled`` of the 4 engine clients drawn
    without replacement, σ = 2 under replace-one (sensitivity 2C: the Gaussian's σ/2), δ = 1/4^1.1
    (``sampled = 4``: every client, no amplification)."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(4, sampled, dp_accounting.GaussianDpEvent(1.0)), 2)
    return float(acc.get_epsilon(1 / 4**1.1))


def test_ffa_with_mixed_ranks_is_accounted_without_amplification(tmp_path: Path) -> None:
    """FFA-LoRA's update shows which columns the round's clients held (their ranks): ε is then the Gaussian
    mechanism's over every round, without the subsampling's amplification (computed here independently)."""
    cfg = engine_config(tmp_path, "ffa", "privacy.clip=0.1", "privacy.noise_multiplier=2.0")
    dp = run(cfg, tmp_path / "run")["privacy"]
    assert dp["amplified"] is False and dp["epsilon"] == pytest.approx(_two_rounds_epsilon(4), rel=1e-9)
    same = engine_config(
        tmp_path, "ffa", "privacy.clip=0.1", "privacy.noise_multiplier=2.0", "ranks.distribution=fixed"
    )
    assert run(same, tmp_path / "equal")["privacy"]["amplified"] is True  # every client holds every column


def test_poisson_sampling_divides_by_the_expected_count() -> None:
    """McMahan et al.'s fixed-denominator estimator: under Poisson sampling a round of K = 2 clients moves the
    FedIT mean by Σ Δ_k / (qN) = Σ Δ_k / 3, not / 2, so the realised count does not show; FlexLoRA's ΔW too."""
    from fedrank.config import RunConfig, override
    from fedrank.privacy import rescale
    from fedrank.simulation import PrivateRounds

    for name in ("fedit", "flexlora"):
        cfg = override(
            RunConfig(),
            {
                "method.name": name,
                "federation.weighting": "uniform",
                "privacy.clip": 1e9,
                "privacy.noise_multiplier": 1e-30,
                "privacy.sampling": "poisson",
                "privacy.seeded": True,
            },
        )
        dp = PrivateRounds.build(cfg, 4, 3, [4, 4, 4, 4], 4)
        m, state, sent, updates = round_of(name, [4, 4], 11)
        noisy, _, record = dp.apply(m, state, updates, sent, 0)
        if name == "flexlora":  # its ΔW is the mean of the whole products: all of it is ÷3 instead of ÷2
            got, want = flat(m.aggregate(state, noisy, [1.0, 1.0])), flat(m.aggregate(state, updates, [1.0, 1.0]))
        else:  # FedIT's mean moves from what was sent by Σ Δ_k / 3
            base = flat(m.aggregate(state, sent_as_updates(sent), [1.0, 1.0]))
            got = flat(m.aggregate(state, noisy, [1.0, 1.0])) - base
            want = flat(m.aggregate(state, updates, [1.0, 1.0])) - base
        torch.testing.assert_close(got, want * 2 / 3, rtol=1e-4, atol=1e-6)
        assert record["epsilon"] > 0
    assert rescale(updates, sent, 1.0) == list(updates)


def sent_as_updates(sent: list[ClientAssignment]) -> list[ClientUpdate]:
    return [ClientUpdate(a.client_id, a.rank, 10, dict(a.factors), a.indices, a.train_A, a.train_B) for a in sent]


def test_poisson_is_refused_where_the_counts_would_show(tmp_path: Path) -> None:
    from fedrank.simulation import Simulation

    cfg = engine_config(tmp_path, "ffa", "privacy.clip=0.1", "privacy.noise_multiplier=1.0", "privacy.sampling=poisson")
    with pytest.raises(ConfigError, match='sampling = "poisson" with ffa whose clients hold different rank indices'):
        Simulation(cfg, tmp_path / "run", progress=False)


def test_every_method_has_a_mechanism_with_a_stated_bound() -> None:
    """All 13 methods: a sensitivity in its own file, and a place in one of the tested mechanisms."""
    from fedrank.aggregation import METHODS

    assert all(callable(getattr(cls, "dp_sensitivity", None)) for cls in METHODS.values())
    assert sorted([*INDEXED, *PRODUCT_SPACE, *JOINT]) == sorted(METHODS)


def test_fedsa_clips_its_whole_b_and_the_client_keeps_its_own() -> None:
    """FedSA-LoRA's state averages the clients' whole B_k (not their change), so under DP the contribution is
    (ΔA_k, B_k): with a persisted B and an unchanged one, the clipped norm still counts all of B."""
    m = method("fedsa")
    state = m.init_state(SHAPES, R)
    g = torch.Generator().manual_seed(8)
    local = {name: torch.randn(f.B.shape[0], 3, generator=g) for name, f in state.factors.items()}
    sent = m.dispatch(state, ClientSpec(0, 3, 10), 1, local)
    moved_a = {n: LoraFactors(f.B, f.A + 0.1) for n, f in sent.factors.items()}
    u = ClientUpdate(0, 3, 10, moved_a)
    whole_b = sum(float(b.square().sum()) for b in local.values())
    change_a = sum(0.01 * f.A.numel() for f in sent.factors.values())
    assert delta_norm(u, sent) == pytest.approx(math.sqrt(change_a), rel=1e-5)
    assert delta_norm(u, m.dp_reference(sent)) == pytest.approx(math.sqrt(change_a + whole_b), rel=1e-5)
    c = clip_update(u, m.dp_reference(sent), 0.5)
    for name, f in c.update.factors.items():  # B shrinks toward zero, A toward what was sent
        torch.testing.assert_close(f.B, c.factor * local[name])
        torch.testing.assert_close(f.A - sent.factors[name].A, c.factor * (moved_a[name].A - sent.factors[name].A))


def test_a_private_fedsa_run_releases_clipped_bs_while_clients_keep_theirs(tmp_path: Path) -> None:
    """Engine, a small clip: every update is clipped and noised, yet what each client persisted for its next
    round is its own B_k, larger than the clip (the clip touches only the release)."""
    from fedrank import checkpoint, run_dir
    from test_flower import records

    cfg = engine_config(tmp_path, "fedsa", "privacy.clip=0.01", "privacy.noise_multiplier=1e-6", "train.lr=0.05")
    run(cfg, tmp_path / "run")
    rounds = [r for r in records(tmp_path / "run") if r["type"] == "round"]
    assert rounds and all(r["dp_clipped"] == 1.0 for r in rounds)
    kept = [p for p in (tmp_path / "run" / run_dir.CLIENTS).rglob(f"*{run_dir.SUFFIX}") if p.is_file()]
    norms = [math.sqrt(sum(float(b.square().sum()) for b in checkpoint.load(p).values())) for p in kept]
    assert kept and min(norms) > 0.05  # each B_k as its client trained it, not clipped to 0.01


def test_raflora_clips_its_partition_pieces_jointly_and_noises_each_partition_sum() -> None:
    """raFLoRA over ranks [2, 4, 4, 8]: partitions [0, 2), [2, 4), [4, 8) with 4, 3 and 1 clients. A client's
    clip bounds the norm of its pieces' concatenation; noise std 1 on each partition sum reaches ΔW with std
    √(1/16 + 1/9 + 1)."""
    m = make_method("raflora", alpha=8.0, seed=0)
    state = m.init_state({"w": (400, 300)}, 8)
    ranks = [2, 4, 4, 8]
    sent = [m.dispatch(state, ClientSpec(k, r, 1), 0) for k, r in enumerate(ranks)]
    g = torch.Generator().manual_seed(2)
    updates = [
        ClientUpdate(a.client_id, a.rank, 1, {k: LoraFactors(torch.randn(f.B.shape, generator=g), f.A)})
        for a in sent
        for k, f in a.factors.items()
    ]
    u, s = updates[3], m.scaling(8)
    pieces = m.dp_pieces(8, ranks)
    assert pieces == [(0, 2), (2, 4), (4, 8)] and m.dp_pieces(4, ranks) == [(0, 2), (2, 4)]
    c = clip_product(u, s, 1e-3, pieces)
    assert product_norm(c.update, s, pieces) == pytest.approx(1e-3, rel=1e-5)
    whole = product_norm(u, s)
    assert abs(product_norm(u, s, pieces) - whole) > 1e-4 * whole  # not ΔW_k's whole norm (cross terms)
    ones = [1.0] * 4
    noise = dense_noise({"w": (400, 300)}, 1.0, derive_generator(4))
    diff = flat(m.aggregate(state, updates, ones, noise=noise)) - flat(m.aggregate(state, updates, ones))
    assert diff.std().item() == pytest.approx(math.sqrt(1 / 16 + 1 / 9 + 1), rel=0.02)


def test_raflora_with_mixed_ranks_refuses_poisson_and_amplification(tmp_path: Path) -> None:
    """raFLoRA's noise scale √(Σ_m 1/c_m²) and its divisors follow how many of the round's clients cover each
    partition, so mixed ranks show part of the sample: Poisson is refused, and ε is accounted without
    amplification (equal ranks keep it)."""
    from fedrank.simulation import Simulation

    on = ("privacy.clip=0.1", "privacy.noise_multiplier=2.0")
    assert run(engine_config(tmp_path, "raflora", *on), tmp_path / "mixed")["privacy"]["amplified"] is False
    equal = engine_config(tmp_path, "raflora", *on, "ranks.distribution=fixed")
    assert run(equal, tmp_path / "equal")["privacy"]["amplified"] is True

    cfg = engine_config(
        tmp_path, "raflora", "privacy.clip=0.1", "privacy.noise_multiplier=1.0", "privacy.sampling=poisson"
    )
    with pytest.raises(ConfigError, match='sampling = "poisson" with raflora whose clients hold different rank'):
        Simulation(cfg, tmp_path / "run", progress=False)


@pytest.mark.parametrize("name", JOINT)
def test_joint_methods_state_is_post_processing_of_the_released_sums(name: str) -> None:
    """FedEx-LoRA and LoRA-FAIR under DP: (1) given the exact product sum, the state equals the method's own
    rule (the identity mean(B_k A_k) − B̄Ā = mean ΔB_kΔA_k − mean ΔB_k·mean ΔA_k); (2) moving part of one
    client's ΔB to another's, which keeps every released sum, leaves the state unchanged: the individual
    products are never read."""
    m, state, sent, updates = round_of(name, RANKS[name], 6)
    ones = [1.0] * len(updates)
    products = product_sum(updates, sent)
    plain, private_ = m.aggregate(state, updates, ones), m.aggregate(state, updates, ones, products=products)
    torch.testing.assert_close(flat(private_), flat(plain), rtol=1e-5, atol=1e-6)
    if name == "fedex":
        for k in state.residual:
            torch.testing.assert_close(private_.residual[k], plain.residual[k], rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(1)
    shift = {k: torch.randn(f.B[:, : updates[0].rank].shape, generator=g) for k, f in updates[0].factors.items()}
    moved = [
        replace_factors(updates[0], {k: LoraFactors(f.B + shift[k], f.A) for k, f in updates[0].factors.items()}),
        replace_factors(
            updates[1],
            {
                k: LoraFactors(torch.cat([f.B[:, : shift[k].shape[1]] - shift[k], f.B[:, shift[k].shape[1] :]], 1), f.A)
                for k, f in updates[1].factors.items()
            },
        ),
        *updates[2:],
    ]
    again = m.aggregate(state, moved, ones, products=products)
    torch.testing.assert_close(flat(again), flat(private_), rtol=1e-5, atol=1e-5)
    if name == "fedex":
        for k in state.residual:
            torch.testing.assert_close(again.residual[k], private_.residual[k], rtol=1e-5, atol=1e-5)


def replace_factors(u: ClientUpdate, factors: dict[str, LoraFactors]) -> ClientUpdate:
    return ClientUpdate(**{**u.__dict__, "factors": factors})


def test_joint_clip_bounds_factors_and_product_together() -> None:
    """clip_joint: the clipped (γΔB, γΔA, γ²P) has norm exactly C; an update within C is untouched."""
    _, _, sent, updates = round_of("fedex", [2, 4, 3], 7)
    u, s = updates[1], sent[1]
    f, p = joint_norms(u, s)
    assert p > 0 and f > 0
    c = clip_joint(u, s, 0.1)
    assert math.hypot(*joint_norms(c.update, s)) == pytest.approx(0.1, rel=1e-6) and c.factor < 1
    assert clip_joint(u, s, math.hypot(f, p) * 1.01).update is u


@pytest.mark.parametrize("name", JOINT)
def test_a_private_joint_run_goes_through_the_released_sums(name: str, tmp_path: Path) -> None:
    """Engine: with a clip no update reaches and noise of std 1e-9, the run's state matches the plain run's to
    rounding (the products path, end to end); with C = 0.05 and σ = 1 every update is clipped, ε is
    reported, and the state moves away from the plain run's."""
    from fedrank.checkpoint import load
    from test_flower import _flat, records

    def state(out: Path) -> dict[str, torch.Tensor]:
        return _flat(load(out / "global_state.safetensors")["state"])

    run(engine_config(tmp_path, name), tmp_path / "plain")
    tiny = ("privacy.clip=1e9", "privacy.noise_multiplier=1e-18", "privacy.seeded=true")
    run(engine_config(tmp_path, name, *tiny), tmp_path / "tiny")
    plain, near = state(tmp_path / "plain"), state(tmp_path / "tiny")
    assert plain.keys() == near.keys()
    for k in plain:
        torch.testing.assert_close(near[k], plain[k], rtol=1e-3, atol=1e-4)  # training amplifies rounding
    noisy = ("privacy.clip=0.05", "privacy.noise_multiplier=1", "privacy.seeded=true")
    summary = run(engine_config(tmp_path, name, *noisy), tmp_path / "noisy")
    rounds = [r for r in records(tmp_path / "noisy") if r["type"] == "round"]
    assert rounds and all(r["dp_clipped"] == 1.0 for r in rounds) and summary["privacy"]["epsilon"] > 0
    far = state(tmp_path / "noisy")
    assert any(not torch.allclose(far[k], plain[k], atol=1e-3) for k in plain)


@pytest.mark.parametrize("name", EVERY_INDEX)
def test_every_index_gets_noise_held_or_not(name: str) -> None:
    """FSLoRA (sketches of 1 of r = 4 indices) and FedEx-LoRA (ranks 1 of R = 4), three clients: the noise
    moves every one of the global factors' entries by N/K, the indices no client held included, so the
    released state shows no sample."""
    m, state, sent, updates = round_of(name, [1, 1, 1], 9)
    held = {i for a in sent for i in (a.indices.tolist() if a.indices is not None else range(a.rank))}
    assert held != set(range(R))  # an index nobody held
    noise = index_noise(state.factors, 1.0, derive_generator(3))
    ones = [1.0] * 3
    extra: dict[str, Any] = {"products": product_sum(updates, sent)} if name in JOINT else {}
    plain = m.aggregate(state, updates, ones, **extra)
    noisy = m.aggregate(state, updates, ones, index_noise=noise, **extra)
    for layer, f in noisy.factors.items():
        step = m.step_size if name == "fslora" else 1.0
        torch.testing.assert_close(f.B - plain.factors[layer].B, step * noise[layer].B / 3, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(f.A - plain.factors[layer].A, step * noise[layer].A / 3, rtol=1e-4, atol=1e-6)


def test_fslora_with_sketches_keeps_amplification_and_accepts_poisson(tmp_path: Path) -> None:
    """FSLoRA noises every index, so its sketches (ranks below the global rank) hide the sample: ε is the
    subsampled mechanism's (as FedIT's, computed here independently), and Poisson sampling is accepted."""
    cfg = engine_config(tmp_path, "fslora", "privacy.clip=0.1", "privacy.noise_multiplier=2.0")
    dp = run(cfg, tmp_path / "run")["privacy"]
    assert dp["amplified"] is True and dp["epsilon"] == pytest.approx(_two_rounds_epsilon(3), rel=1e-9)
    poisson = engine_config(
        tmp_path,
        "fslora",
        "privacy.clip=0.1",
        "privacy.noise_multiplier=2.0",
        "privacy.sampling=poisson",
        "privacy.accountant=pld",
    )
    assert run(poisson, tmp_path / "poisson")["privacy"]["amplified"] is True


def test_the_privacy_experiments_table_is_the_runs_means_and_names_what_was_not_run(tmp_path: Path) -> None:
    """scripts/privacy_experiment.py's results: per method and ε the mean over seeds of each run's summary,
    FFA-LoRA − FedIT paired by seed, and the cells not run named (the runs are fakes: only the table is checked)."""
    import importlib.util
    import json
    import math

    spec = importlib.util.spec_from_file_location(
        "privacy_experiment", Path(__file__).parents[1] / "scripts" / "privacy_experiment.py"
    )
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    losses = {("fedit", math.inf): (1.0, 2.0), ("ffa", math.inf): (1.5, 2.1), ("fedit", 8.0): (20.0, 24.0)}
    runs = {}
    for (m, eps), by_seed in losses.items():
        for s, loss in zip((1, 2), by_seed, strict=True):
            run = tmp_path / f"{m}-{eps}-{s}"
            run.mkdir()
            doc = {
                g: {"loss": loss, "rougeL": 0.1} for g in ("unseen_after", "seen_after", "unseen_before", "seen_before")
            }
            doc["privacy"] = {"noise_multiplier": 0.0 if math.isinf(eps) else 1.3}
            (run / "summary.json").write_text(json.dumps(doc))
            runs[(m, eps, s)] = run
    script.write_results(runs, {"fedit": 2.0}, [1, 2], [math.inf, 8.0], tmp_path / "out", "CMD")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "not run: ffa at ε 8, flexlora at ε inf, flexlora at ε 8, fslora at ε inf, fslora at ε 8." in md
    assert "| fedit | 8 | 2 | 1.3 | 22.0000 [" in md
    assert "| fedit | inf | inf | 0 | 1.5000 [" in md  # the ε = ∞ runs clip nothing
    assert "- ε inf, unseen loss: +0.3000 [" in md  # (0.5 + 0.1) / 2
    assert "ε 8, unseen loss" not in md  # FFA-LoRA has no ε = 8 run here
