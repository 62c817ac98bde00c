"""Config resolution: preset -> YAML -> --set, with types checked and unknown keys rejected."""

import pytest
import yaml

from lmforge import config as cfgmod
from lmforge.errors import UserError


def test_overrides_are_typed_and_applied_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  n_layer: 3\ntrain:\n  lr: 0.01\n")
    cfg = cfgmod.build_config("debug", f, ["train.lr=3e-4", "train.max_seconds=none", "model.dropout=0.1",
                                           "train.compile=true"])
    assert cfg.model.n_layer == 3 and cfg.model.n_embd == 32  # file over preset
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # "3e-4" is a float, not a string
    assert cfg.train.max_seconds is None and cfg.train.compile is True and cfg.model.dropout == 0.1


def test_saved_config_round_trips(tmp_path):
    cfg = cfgmod.build_config("micro", overrides=["train.lr=1e-3"])
    cfgmod.save(cfg, tmp_path / "config.yaml")
    assert cfgmod.load(tmp_path / "config.yaml") == cfg


def test_saved_config_with_an_unknown_key_names_the_file(tmp_path):
    cfg = cfgmod.build_config("micro")
    cfgmod.save(cfg, tmp_path / "config.yaml")
    data = cfgmod.load_yaml(tmp_path / "config.yaml")
    data["model"]["rope_theta"] = 10000.0  # a key some other version of lmforge writes
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(UserError, match=r"config\.yaml: unknown config key 'model\.rope_theta'.*newer version"):
        cfgmod.load(tmp_path / "config.yaml")


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("optim.lr=1", "unknown config section"),
    ("train.batch_size=1.5", "expects int"),
    ("model.n_head=3", "divisible"),
    ("train.lr=-1", "must be positive"),
    ("train.optimizer=lion", "train.optimizer must be one of adamw, adam, sgd, muon"),
    ("train.muon_lr=0", "train.muon_lr must be positive"),
    ("train.layer_lr_decay=0", r"train.layer_lr_decay must be in \(0, 1\]"),
    ("task.label_smoothing=1", r"task.label_smoothing must be in \[0, 1\)"),  # a classify option
    ("model.pos_init=rope", "model.pos_init must be normal or sinusoidal"),
    ("model.prev_token_head=true", "model.prev_token_head needs model.pos_init=sinusoidal"),
])
def test_bad_overrides(override, message):
    with pytest.raises(UserError, match=message):
        if override.startswith("task."):
            cfgmod.build_config(task="classify", overrides=[override])
        else:
            cfgmod.build_config("debug", overrides=[override])


def test_muon_refuses_fsdp():
    with pytest.raises(UserError, match="cannot run with train.fsdp"):
        cfgmod.build_config("micro", overrides=["train.fsdp=true"])


def test_loss_chunk_defaults_by_device():
    from lmforge.config import build_config, loss_chunk_for

    cfg = build_config("micro")
    assert cfg.train.loss_chunk is None and cfg.train.compile is None
    assert loss_chunk_for(None, "cpu") == 256  # measured faster on CPU
    assert loss_chunk_for(None, "cuda") == 0  # full logits: torch.compile fuses the loss
    assert loss_chunk_for(1024, "cuda") == 1024


def test_a_config_saved_before_the_task_section_loads_with_its_task_inferred(tmp_path):
    cfg = cfgmod.build_config("debug")
    old = cfgmod.to_dict(cfg)
    del old["task"], old["data"]
    old["train"]["label_smoothing"] = 0.0  # a train key then; a classify option now
    lm = cfgmod.from_dict(old)
    assert lm.task.name == "lm" and lm.train == cfg.train
    bert = cfgmod.to_dict(cfgmod.build_config("bert-debug"))
    del bert["task"], bert["data"]
    bert["model"]["num_labels"] = 3
    bert["train"]["label_smoothing"] = 0.1
    clf = cfgmod.from_dict(bert)
    assert clf.task.name == "classify" and clf.task.label_smoothing == 0.1
    del bert["model"]["num_labels"]
    assert cfgmod.from_dict(bert).task.name == "mlm"
