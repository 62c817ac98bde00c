"""Optimizers: our Muon against torch.optim.Muon, the parameter split, and the combined state dict."""

import pytest
import torch

from lmforge import config as cfgmod
from lmforge.models.gpt import GPT
from lmforge.train.muon import Muon
from lmforge.train.optim import build_optimizer, lr_at, set_lr


def _debug_gpt() -> GPT:
    torch.manual_seed(0)
    cfg = cfgmod.build_config("debug").model
    cfg.vocab_size = 64
    return GPT(cfg)


def _steps(opt, params, grads):
    for g in grads:
        for p in params:
            p.grad = g[:p.shape[0], :p.shape[1]].clone()
        opt.step()


def test_muon_equals_torch_muon_in_bfloat16_and_is_close_in_float32():
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 96), (48, 48)]  # tall, wide (the iteration transposes tall ones), square
    grads = [torch.randn(96, 96) for _ in range(6)]
    ref = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    start = [p.detach().clone() for p in ref]
    ours16 = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    ours32 = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    _steps(torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"), ref, grads)
    _steps(Muon(ours16, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16), ours16, grads)
    _steps(Muon(ours32, lr=0.02, weight_decay=0.1), ours32, grads)
    for r, a, b, s in zip(ref, ours16, ours32, start):
        assert torch.equal(r, a)  # the same algorithm, bit for bit
        moved = (r - s).abs().max()
        assert (r - b).abs().max() < 0.05 * moved  # float32 iteration: bfloat16 rounding only


def test_muon_update_is_orthogonalised():
    """Whatever the gradient's scale and conditioning, the update's singular values are near 1."""
    w = torch.nn.Parameter(torch.zeros(64, 32))
    opt = Muon([w], lr=1.0, weight_decay=0.0, momentum=0.0)
    u, _, v = torch.linalg.svd(torch.randn(64, 32), full_matrices=False)
    w.grad = 1e3 * u @ torch.diag(torch.logspace(0, -2, 32)) @ v  # condition number 100
    opt.step()
    s = torch.linalg.svdvals(-w.detach() / (0.2 * 64 ** 0.5))
    assert 0.5 < s.min() and s.max() < 1.3, s  # from a spread of 100x to under 3x


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = _debug_gpt()
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", "muon", muon_lr=2e-3)
    adamw, muon = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert muon_names and all(n.endswith(".weight") and ".h." in n and "ln_" not in n for n in muon_names)
    assert not any("wte" in n or "wpe" in n for n in muon_names)  # embeddings and the tied head: AdamW
    everything = [p for g in opt.param_groups for p in g["params"]]
    assert len(everything) == len({id(p) for p in everything}) == len(list(model.parameters()))
    set_lr(opt, 0.5)
    assert [g["lr"] for g in adamw.param_groups] == [0.5] and [g["lr"] for g in muon.param_groups] == [1.0]
    with pytest.raises(ValueError):
        build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", "lion")


def test_combined_state_dict_round_trips():
    model = _debug_gpt()
    x = torch.randint(0, model.config.vocab_size, (2, 16))

    def step(opt):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()

    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", "muon")
    step(opt)
    sd = opt.state_dict()
    n = sum(len(g["params"]) for g in sd["param_groups"])
    assert sorted(sd["state"]) == list(range(n))  # numbered across both optimizers, as for one
    fresh = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", "muon")
    fresh.load_state_dict(sd)
    for a, b in zip(opt.optimizers, fresh.optimizers):
        for p in a.state:
            for k, v in a.state[p].items():
                assert torch.equal(v, b.state[p][k]) if torch.is_tensor(v) else v == b.state[p][k]


def test_schedule_warms_up_then_decays_to_the_floor():
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(50, 1.0, 10, None, 0.1) == 1.0  # schedule not planned yet: the peak


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_layer_wise_decay_scales_each_blocks_learning_rate(kind):
    from lmforge.models.bert import Bert

    cfg = cfgmod.build_config("bert-debug").model  # 2 blocks
    cfg.vocab_size, cfg.num_labels, cfg.mlm_head = 64, 3, False
    model = Bert(cfg)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", kind, muon_lr=2e-3, layer_decay=0.5)
    set_lr(opt, 1e-3)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    muon = 2.0 if kind == "muon" else 1.0  # Muon's matrices run at muon_lr / lr times the rest
    params = dict(model.named_parameters())
    assert lr_of[id(params["classifier.weight"])] == pytest.approx(1e-3 * muon)
    assert lr_of[id(params["classifier.bias"])] == pytest.approx(1e-3)
    assert lr_of[id(params["bert.encoder.layer.1.attention.self.query.weight"])] == pytest.approx(0.5e-3 * muon)
    assert lr_of[id(params["bert.encoder.layer.1.attention.self.query.bias"])] == pytest.approx(0.5e-3)
    assert lr_of[id(params["bert.encoder.layer.0.output.dense.weight"])] == pytest.approx(0.25e-3 * muon)
    assert lr_of[id(params["bert.embeddings.word_embeddings.weight"])] == pytest.approx(0.125e-3)
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)  # every parameter, once
    # Without decay: one learning rate for everything (Muon's matrices apart).
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", kind, muon_lr=2e-3)
    set_lr(opt, 1e-3)
    assert {round(g["lr"] * 1e3, 6) for g in opt.param_groups} == ({1.0, 2.0} if kind == "muon" else {1.0})
