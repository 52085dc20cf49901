"""Keeping what the model knew: L2-SP, EWC and distillation (objectives/keep.py, objectives/distill.py).

The proofs of issue #7: the gradient of L2-SP is lambda * (theta - theta0); EWC with a unit
Fisher equals L2-SP; the distillation KL is zero before any update (fused kernels on and off) and
positive after one. Plus: the LoRA delta computed from r x r products equals the materialised
one; the Fisher is written, reused and combined online; every objective changes a short
fine_tune with lora and full; a resumed run keeps the anchor of its first session.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from conftest import tiny_config, train_one_and_two
from tunelab.config import load_config
from tunelab.data.batching import IGNORE, Row
from tunelab.errors import ConfigError, UserError
from tunelab.objectives import distill as dist
from tunelab.objectives import keep
from tunelab.train.recipe import fine_tune

# --------------------------------------------------------------------------- small models


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.emb = nn.Embedding(7, 4)


def lora_toy(seed: int = 0) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_modules=["lin", "emb"]), Toy())
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            nn.init.normal_(p, std=0.5)  # B is zero after init: give the delta a value
    return model


def materialised_deltas(model) -> dict[str, torch.Tensor]:
    lin, emb = model.lin, model.emb
    return {"lin.weight": lin.scaling["default"] * lin.lora_B["default"].weight @ lin.lora_A["default"].weight,
            "emb.weight": (emb.scaling["default"] * emb.lora_embedding_B["default"] @ emb.lora_embedding_A["default"]).T}


def test_l2sp_gradient_is_lambda_times_distance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    targets = keep.collect_targets(model)
    anchor = keep.Anchor.capture(targets)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    lam = 3.5
    penalty = keep.KeepPenalty(targets, anchor, l2sp=lam)
    penalty().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, lam * (p.detach() - theta0[name]))
    assert penalty.last["l2sp"] == pytest.approx(
        lam / 2 * sum((p.detach() - theta0[n]).pow(2).sum().item() for n, p in model.named_parameters()), rel=1e-5)


def test_lora_l2sp_from_rank_r_products_equals_the_materialised_delta():
    model = lora_toy()
    targets = keep.collect_targets(model)
    assert sorted(t.key for t in targets) == ["emb.weight", "lin.weight"]  # named after the base weights
    assert all(isinstance(t, keep.LowRank) for t in targets)
    # anchor: a fresh adapter (zero delta), then a non-zero one (an adapter that trains on, stage 2)
    zero = keep.Anchor({k: torch.zeros_like(v) for k, v in keep.Anchor.capture(targets).theta0.items()})
    start = keep.Anchor.capture(targets)
    d0 = {k: v.detach().clone() for k, v in materialised_deltas(model).items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
    for anchor, ref in ((zero, {k: torch.zeros_like(v) for k, v in d0.items()}), (start, d0)):
        for p in model.parameters():
            p.grad = None
        fast = keep.l2sp_sum(targets, anchor)
        fast.backward()
        fast_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        for p in model.parameters():
            p.grad = None
        slow = sum((d - ref[k]).pow(2).sum() for k, d in materialised_deltas(model).items())
        slow.backward()
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
        for g_fast, p in zip(fast_grads, [p for p in model.parameters() if p.requires_grad], strict=True):
            torch.testing.assert_close(g_fast, p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["plain", "lora"])
def test_ewc_with_a_unit_fisher_equals_l2sp(kind):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)) if kind == "plain" else lora_toy()
    targets = keep.collect_targets(model)
    anchor = keep.Anchor.capture(targets)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    shapes = {t.key: (t.param.shape if isinstance(t, keep.Plain) else keep.base_shape(t)) for t in targets}
    results = []
    for make in (lambda: keep.KeepPenalty(targets, anchor, l2sp=2.0),
                 lambda: keep.KeepPenalty(targets, anchor, ewc=2.0, fisher={k: torch.ones(s) for k, s in shapes.items()})):
        for p in model.parameters():
            p.grad = None
        value = make()()
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if kind == "lora":  # a non-uniform Fisher: the rank-r gradients of _LowRankEWC match autograd on dW
        fisher = {k: torch.rand(s) for k, s in shapes.items()}
        for p in model.parameters():
            p.grad = None
        keep.ewc_sum(targets, anchor, fisher).backward()
        fast = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        for p in model.parameters():
            p.grad = None
        d0 = {t.key: (anchor.theta0[f"{t.key}@B"] @ anchor.theta0[f"{t.key}@A"]) for t in targets}
        d0["emb.weight"] = d0["emb.weight"].T
        sum((fisher[k] * (d - d0[k]) ** 2).sum() for k, d in materialised_deltas(model).items()).backward()
        for a, p in zip(fast, [p for p in model.parameters() if p.requires_grad], strict=True):
            torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- tiny-random-llama


@pytest.fixture(scope="module")
def tiny_rows() -> list[Row]:
    rng = random.Random(0)
    rows = []
    for n in (12, 9, 15, 7):
        ids = tuple(rng.randrange(100, 5000) for _ in range(n))
        labels = tuple(IGNORE if i < 3 else t for i, t in enumerate(ids))
        rows.append(Row(ids, labels, (n,)))
    return rows


def tiny_lora_loss():
    from tunelab import methods
    from tunelab.models.load import load_model
    from tunelab.objectives.causal_lm import CausalLMLoss

    torch.manual_seed(0)
    lora = methods.get("lora")
    model = lora.apply(load_model("tiny-random-llama"), lora.Config(r=4, alpha=8))
    return CausalLMLoss(model)


def batch_of(rows):
    from tunelab.data.batching import collate

    return collate(rows, pad_id=0, packed=False)


@pytest.mark.parametrize("fused", [True, False], ids=["kernels-on", "kernels-off"])
def test_distillation_kl_is_zero_before_any_update_and_positive_after(tiny_rows, fused):
    from tunelab.kernels import training_kernels

    loss = tiny_lora_loss()
    with training_kernels(loss.model, enabled=fused) as k:
        assert any("fused LoRA" in name for name in k.active) == fused
        _distillation_kl_before_and_after_an_update(loss, tiny_rows)


def _distillation_kl_before_and_after_an_update(loss, tiny_rows):
    distiller = dist.Distiller(1.0, 2.0, "adapters_off")
    loss.distill = distiller
    loss.train()
    batch = batch_of(tiny_rows)
    loss(**batch)
    assert distiller.take_metrics()["distill_kl"] == 0.0
    with torch.no_grad():  # an update: the adapter's B away from zero
        for name, p in loss.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    ce2 = loss(**batch).total
    assert distiller.take_metrics()["distill_kl"] > 1e-4
    ce2.backward()  # the KL's gradient reaches the adapter...
    grads = [p.grad for n_, p in loss.model.named_parameters() if "lora_A" in n_]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    loss.distill = None  # ...while the returned value is the CE alone
    assert loss(**batch).total.item() == pytest.approx(ce2.item(), rel=1e-6)


def test_chunked_kl_gradient_matches_autograd_for_full_and_top_k_teachers():
    torch.manual_seed(0)
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    ht, t = torch.randn(10, 8), 1.7
    tw = torch.rand(10)
    logits_t = ht @ w.detach().T
    p = torch.softmax(logits_t / t, -1)
    # full teacher
    value = dist.ChunkedLinearKL.apply(h, w, dist._FullTeacher(ht, w.detach(), t), t, tw, 4)
    value.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    logq = torch.log_softmax(h @ w.T / t, -1)
    ref = t * t * ((p * (p.log() - logq)).sum(-1) * tw).sum()
    ref.backward()
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-6)
    # top-k teacher: k + 1 buckets
    h.grad = w.grad = None
    logp_all = torch.log_softmax(logits_t / t, -1)
    vals, idx = logp_all.topk(5, -1)
    value = dist.ChunkedLinearKL.apply(h, w, dist._TopKTeacher(idx, vals), t, None, 3)
    value.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    q = torch.softmax(h @ w.T / t, -1)
    q_k, p_k = q.gather(1, idx), vals.exp()
    p_r, q_r = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
    ref = t * t * ((p_k * (p_k.log() - q_k.log())).sum(-1) + p_r * (p_r.log() - q_r.log())).sum()
    ref.backward()
    torch.testing.assert_close(value, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gh, h.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-3, atol=1e-5)


def test_cached_top_k_teacher_is_zero_before_any_update_and_reused(tmp_path, tiny_rows):
    loss = tiny_lora_loss()
    path = tmp_path / dist.CACHE_FILE
    cache = dist.build_topk_cache(loss, tiny_rows, path=path, top_k=8, temperature=2.0, pad_id=0, packed=False,
                                  batch_size=2, adapters_off=True)
    saved = load_file(str(path))
    assert saved["indices"].shape == (sum(r.n_targets for r in tiny_rows), 8)
    before = path.stat().st_mtime_ns
    dist.build_topk_cache(loss, tiny_rows, path=path, top_k=8, temperature=2.0, pad_id=0, packed=False,
                          batch_size=3, adapters_off=True)  # read back, not recomputed
    assert path.stat().st_mtime_ns == before
    distiller = dist.Distiller(1.0, 2.0, "cached", cache=cache)
    loss.distill = distiller
    loss.train()
    loss(**batch_of(tiny_rows[::-1]))  # another order and batch shape: found by content
    assert distiller.take_metrics()["distill_kl"] == pytest.approx(0.0, abs=1e-6)


def test_fisher_of_lora_targets_is_over_the_base_weights_and_round_trips(tmp_path, tiny_rows):
    loss = tiny_lora_loss()
    targets = keep.collect_targets(loss.model)
    fisher = keep.estimate_fisher(loss, tiny_rows, targets, samples=2, pad_id=0, packed=False, seed=0)
    base = dict(loss.model.get_base_model().named_parameters())
    for t in targets:
        assert t.key.startswith("model.layers.") and isinstance(t, keep.LowRank)
        assert fisher[t.key].shape == base[t.key.replace(".weight", ".base_layer.weight")].shape
        assert (fisher[t.key] >= 0).all() and fisher[t.key].sum() > 0
    again = keep.estimate_fisher(loss, tiny_rows, targets, samples=2, pad_id=0, packed=False, seed=0)
    assert all(torch.equal(fisher[k], again[k]) for k in fisher)  # seeded
    anchor = keep.Anchor.capture(targets)
    keep.save_fisher(tmp_path / "f.safetensors", fisher, anchor, {"samples": 2})
    f2, a2, meta = keep.load_fisher(tmp_path / "f.safetensors")
    assert meta == {"samples": 2} and all(torch.equal(fisher[k], f2[k]) for k in fisher)
    assert all(torch.equal(anchor.theta0[k], a2.theta0[k]) for k in anchor.theta0)
    online = keep.combine_fisher(fisher, again, 0.5)
    torch.testing.assert_close(online[targets[0].key], 1.5 * fisher[targets[0].key])


# --------------------------------------------------------------------------- fine_tune


def run_cfg(tmp_path: Path, cfg: dict, name: str, *, resume: bool = False):
    cfg = {**cfg, "run": {**cfg["run"], "name": name}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config, sources = load_config(path)
    return fine_tune(config, sources, resume=resume)


def short(tmp_path, alpaca_path, method: dict, objectives: dict | None = None, **train) -> dict:
    return tiny_config(tmp_path, alpaca_path, method=method,
                       data={"train": [{"path": str(alpaca_path), "limit": 8}], "max_length": 64},
                       train={"max_steps": 3, "lr": 2e-2, "batch_size": 2, "grad_accum": 1, "schedule": "constant",
                              **train},
                       objectives=objectives or {})


def distance_to_start(out) -> float:
    """||theta - theta0||: the LoRA deltas of the final adapter, or the full weights vs the base."""
    from tunelab.models.load import load_model

    final = out.run_dir / "final"
    if (final / "adapter_model.safetensors").is_file():
        t = load_file(str(final / "adapter_model.safetensors"))
        return sum((t[k.replace("lora_A", "lora_B")] @ t[k]).pow(2).sum().item() for k in t if "lora_A" in k) ** 0.5
    base = dict(load_model("tiny-random-llama").named_parameters())
    tuned = dict(out.model.named_parameters())
    return sum((tuned[k].detach() - base[k].detach()).pow(2).sum().item() for k in base) ** 0.5


def train_records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "alpha": 8}, {"name": "full"}], ids=["lora", "full"])
def test_each_objective_changes_a_short_run(tmp_path, alpaca_path, method):
    base = run_cfg(tmp_path, short(tmp_path, alpaca_path, method), "none")
    d_none = distance_to_start(base)
    assert d_none > 0
    for name, objectives in (("l2sp", {"l2sp": {"weight": 1000.0}}),
                             ("ewc", {"ewc": {"weight": 1e5, "samples": 2}}),
                             ("distill", {"distill": {"weight": 5.0}})):
        out = run_cfg(tmp_path, short(tmp_path, alpaca_path, method, objectives), name)
        records = train_records(out.run_dir)
        d = distance_to_start(out)
        assert d != pytest.approx(d_none, rel=1e-6), name
        if name == "distill":
            assert records[0]["distill_kl"] == pytest.approx(0.0, abs=1e-6)  # the first step starts at the teacher
            assert records[-1]["distill_kl"] > 0
        else:
            assert d < d_none, name  # kept closer to theta0
            assert records[0][name] == 0.0 and records[-1][name] > 0  # theta = theta0 at the first step
        if name == "ewc":
            assert (out.run_dir / keep.FISHER_FILE).is_file()


def test_resume_keeps_the_anchor_of_the_first_session(tmp_path, alpaca_path):
    objectives = {"l2sp": {"weight": 50.0}, "ewc": {"weight": 1e4, "samples": 2}}
    cfg = short(tmp_path, alpaca_path, {"name": "full"}, objectives, save_every=2, max_steps=4)
    whole = run_cfg(tmp_path, cfg, "whole")
    final = {k: v.detach().clone() for k, v in whole.model.named_parameters()}
    run_dir = whole.run_dir
    # back to the checkpoint of step 2, as if the process had died after it
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")
    shutil.rmtree(run_dir / "final")
    fisher_before = load_file(str(run_dir / keep.FISHER_FILE))
    resumed = run_cfg(tmp_path, cfg, "whole", resume=True)
    assert resumed.summary["steps_this_session"] == 2
    for k, v in resumed.model.named_parameters():
        torch.testing.assert_close(v.detach(), final[k], rtol=0, atol=0)
    fisher_after = load_file(str(run_dir / keep.FISHER_FILE))
    assert all(torch.equal(fisher_before[k], fisher_after[k]) for k in fisher_before)


def test_ewc_fisher_reused_and_combined_online(tmp_path, alpaca_path):
    lora = {"name": "lora", "r": 4, "alpha": 8}
    first = run_cfg(tmp_path, short(tmp_path, alpaca_path, lora, {"ewc": {"weight": 10.0, "samples": 2}}, max_steps=1),
                    "first")
    old = load_file(str(first.run_dir / keep.FISHER_FILE))
    reuse = run_cfg(tmp_path, short(tmp_path, alpaca_path, lora, {"ewc": {"weight": 10.0, "fisher": str(
        first.run_dir / keep.FISHER_FILE)}}, max_steps=1), "reuse")
    reused = load_file(str(reuse.run_dir / keep.FISHER_FILE))
    assert all(torch.equal(old[k], reused[k]) for k in old if k.startswith("fisher/"))
    online = run_cfg(tmp_path, short(tmp_path, alpaca_path, lora, {"ewc": {"weight": 10.0, "samples": 2, "online": True,
                     "gamma": 0.5, "fisher": str(first.run_dir / keep.FISHER_FILE)}}, max_steps=1), "online")
    combined = load_file(str(online.run_dir / keep.FISHER_FILE))
    # same start, data and seed: F_new = F_old, so gamma * F_old + F_new = 1.5 F_old
    for k in old:
        if k.startswith("fisher/"):
            torch.testing.assert_close(combined[k], 1.5 * old[k])


def test_classification_takes_l2sp_and_ewc_and_rejects_distillation(tmp_path):
    from test_classification import cls_config

    cfg = cls_config(tmp_path, "cls", {"name": "lora", "r": 4, "alpha": 8},
                     train={"max_steps": 3, "eval_every": 0, "epochs": None}, n_train=16)
    cfg["data"].pop("eval")
    cfg["objectives"] = {"l2sp": {"weight": 100.0}, "ewc": {"weight": 100.0, "samples": 2}}
    out = run_cfg(tmp_path, cfg, "cls")
    records = train_records(out.run_dir)
    assert records[-1]["l2sp"] > 0 and records[-1]["ewc"] > 0
    fisher = load_file(str(out.run_dir / keep.FISHER_FILE))
    assert not any(k.startswith("fisher/score.") for k in fisher)  # the new head has nothing to keep
    cfg["objectives"] = {"distill": {"weight": 1.0}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="objectives.distill with task: classification"):
        load_config(path)


def test_answer_as_text_task_takes_instruction_data_as_ewc_and_distill_reference(tmp_path, alpaca_path):
    """General instruction data (no label) is the usual reference for a generative classification
    task: it is read as SFT rows, not rejected for a missing label."""
    from test_classification import cls_config

    cfg = cls_config(tmp_path, "gen", {"name": "lora", "r": 4, "alpha": 8},
                     train={"max_steps": 2, "eval_every": 0, "epochs": None}, n_train=16)
    cfg["task"] = "generative_classification"
    cfg["data"]["max_length"] = 128
    cfg["data"].pop("eval")
    ref = [{"path": str(alpaca_path), "limit": 4}]
    cfg["objectives"] = {"ewc": {"weight": 100.0, "samples": 2, "data": ref}, "distill": {"weight": 1.0, "data": ref}}
    out = run_cfg(tmp_path, cfg, "gen")
    assert train_records(out.run_dir)[-1]["ewc"] > 0
    assert (out.run_dir / "reference" / "ewc").is_dir()
    cls_file = cfg["data"]["train"][0]["path"]
    cfg["objectives"] = {"ewc": {"weight": 1.0, "samples": 2, "data": [*ref, {"path": cls_file}]}}
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump({**cfg, "run": {**cfg["run"], "name": "mixed"}}))
    with pytest.raises(UserError, match="objectives.ewc.data: mixes classification files"):
        fine_tune(*load_config(path))


def test_distillation_on_reference_data_with_a_cached_teacher_resumes_exactly(tmp_path, alpaca_path):
    from conftest import shared

    c4 = shared("instruct", "llamafactory_demo", "c4_demo.jsonl")
    objectives = {"distill": {"weight": 2.0, "teacher": "cached", "top_k": 16, "data": [{"path": str(c4), "limit": 4}]}}
    cfg = short(tmp_path, alpaca_path, {"name": "full"}, objectives, save_every=2, max_steps=3)
    whole = run_cfg(tmp_path, cfg, "ref")
    run_dir = whole.run_dir
    records = train_records(run_dir)
    assert records[0]["distill_kl"] == pytest.approx(0.0, abs=1e-6) and records[-1]["distill_kl"] > 0
    assert records[-1]["distill"] > 0 and records[-1]["penalty"] == pytest.approx(records[-1]["distill"])
    ref_data = json.loads((run_dir / "reference" / "distill" / "data.json").read_text())
    assert ref_data["files"][0]["records"] == 4 and ref_data["train_samples"] >= 4  # long texts: several windows
    cache = run_dir / dist.CACHE_FILE
    assert load_file(str(cache))["indices"].shape[1] == 16
    written = cache.stat().st_mtime_ns
    final = {k: v.detach().clone() for k, v in whole.model.named_parameters()}
    shutil.rmtree(run_dir / "checkpoints" / "step-000003")
    shutil.rmtree(run_dir / "final")
    resumed = run_cfg(tmp_path, cfg, "ref", resume=True)
    assert cache.stat().st_mtime_ns == written  # the teacher's top-k read back, not recomputed
    for k, v in resumed.model.named_parameters():
        torch.testing.assert_close(v.detach(), final[k], rtol=0, atol=0)


@pytest.mark.slow
def test_objectives_one_process_equals_two_processes(tmp_path, alpaca_path):
    """DDP (gloo, CPU): the penalties, the Fisher (estimated on shards, summed) and the distillation KL."""

    objectives = {"l2sp": {"weight": 100.0}, "ewc": {"weight": 1e3, "samples": 4}, "distill": {"weight": 2.0}}
    common = {"lr": 1e-2, "max_steps": 3, "grad_accum": 2, "schedule": "constant", "threads": 1}
    data = {"train": [{"path": str(alpaca_path), "limit": 24}], "max_length": 64}
    one = tiny_config(tmp_path, alpaca_path, train={**common, "batch_size": 2}, run={"name": "one"}, data=data,
                      objectives=objectives)
    two = tiny_config(tmp_path, alpaca_path, train={**common, "batch_size": 1}, run={"name": "two"}, data=data,
                      objectives=objectives)
    one["run"]["output_dir"] = two["run"]["output_dir"] = str(tmp_path / "runs")
    run1, run2 = train_one_and_two(tmp_path, one, two)
    f1, f2 = load_file(str(run1 / keep.FISHER_FILE)), load_file(str(run2 / keep.FISHER_FILE))
    for k in f1:
        torch.testing.assert_close(f1[k], f2[k], atol=1e-6, rtol=1e-4)
    r1, r2 = train_records(run1), train_records(run2)
    for a, b in zip(r1, r2, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["penalty"] == pytest.approx(b["penalty"], rel=1e-4, abs=1e-7)
    w1 = load_file(str(run1 / "final" / "adapter_model.safetensors"))
    w2 = load_file(str(run2 / "final" / "adapter_model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4)
