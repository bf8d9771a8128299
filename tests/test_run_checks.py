"""Checks that run before anything compiles: sequence length against the model's
positions, parameter-group rules, `None` from the command line."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from coach_jax import models
from coach_jax.config import ConfigError, resolve
from coach_jax.models.config import MoeSpec
from coach_jax.train import param_groups
from coach_jax.train.param_groups import ParamGroupError, ParamGroups
from test_trainer import LAB, ROOT, tiny_config


def test_a_sequence_longer_than_the_models_positions_is_refused(tmp_path):
    config = tiny_config(tmp_path, **{"data.max_seq_len": 1024})
    config.model.init.max_position_embeddings = 512
    with pytest.raises(ConfigError, match=r"data.max_seq_len=1024 is longer than the model's "
                                          r"max_position_embeddings=512 \(model.init\)"):
        resolve(config, 1)
    folder = tmp_path / "base"
    shutil.copytree(os.path.join(LAB, "base"), folder)
    hf = json.load(open(folder / "config.json"))
    hf["max_position_embeddings"] = 128
    json.dump(hf, open(folder / "config.json", "w"))
    config = tiny_config(tmp_path, **{"data.max_seq_len": 256})
    config.model.hf_path = str(folder)
    with pytest.raises(ConfigError, match=r"max_seq_len=256 .* max_position_embeddings=128 "
                                          r"\(.*base/config.json\)"):
        resolve(config, 1)
    config.data.max_seq_len = 128
    assert resolve(config, 1).data.max_seq_len == 128


@pytest.mark.parametrize("key, value, message", [
    ("freeze", ("(embed",), r"train.freeze: '\(embed' is not a valid regular expression"),
    ("lr_multipliers", ("embed_tokens=fast",), r"train.lr_multipliers: 'embed_tokens=fast' "
                                               r"is not 'regex=multiplier'"),
    ("lr_multipliers", ("embed_tokens=-1",), r"train.lr_multipliers: 'embed_tokens' has "
                                             r"multiplier -1.0; it must be a positive number"),
])
def test_bad_parameter_group_rules_are_one_line_naming_the_key(tmp_path, key, value, message):
    config = tiny_config(tmp_path)
    config.train[key] = value
    with pytest.raises(ConfigError, match=message):
        resolve(config, 1)


def test_a_rule_that_matches_nothing_names_the_key_and_the_tied_head():
    _, params = models.load_hf(os.path.join(LAB, "base"))
    assert "lm_head" not in params  # the lab base ties its head, like the recipe models
    with pytest.raises(ParamGroupError, match=r"train.lr_multipliers: 'lm_head' matches no "
                                              r"parameter; this model ties its LM head"):
        param_groups.check_rules_match(params, ParamGroups((("lm_head", 0.5),)))
    with pytest.raises(ParamGroupError, match=r"train.freeze: 'q_porj' matches no parameter; "
                                              r"the parameters are: .*q_proj"):
        param_groups.check_rules_match(params, ParamGroups((("q_porj", "frozen"),)))


def _parsed(*args):
    """The config main.py would run with, printed as JSON by a fresh process."""
    script = ("import json, sys\nfrom coach_jax import main\n"
              "main.parse_flags(sys.argv)\n"
              "c = main.run_config('train', None)\n"
              "print(json.dumps({'name': c.optimizer.name, 'wd': c.optimizer.weight_decay, "
              "'packing': c.data.packing}))")
    return subprocess.run([sys.executable, "-c", script, "--config", "configs/default.py",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_none_can_be_set_from_the_command_line_for_optional_keys():
    result = _parsed("--config.optimizer.name=sgd", "--config.optimizer.weight_decay=None",
                     "--config.data.packing=none")  # the string "none" stays a string
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"name": "sgd", "wd": None, "packing": "none"}
    refused = _parsed("--config.data.max_seq_len=None")
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("coach_jax: error: --config.data.max_seq_len=None: "
                                             "data.max_seq_len cannot be None; the keys that can")
    assert "optimizer.weight_decay" in refused.stderr


def test_did_you_mean_has_plain_quotes():
    result = _parsed("--config.optimizer.nme=lion")
    assert result.returncode == 2
    assert "\\'" not in result.stderr and "'nme'" in result.stderr


def test_a_wandb_project_without_wandb_installed_is_refused_before_anything_loads(
        tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    config = tiny_config(tmp_path)
    config.logging.wandb_project = "coach"
    with pytest.raises(ConfigError, match=r"logging.wandb_project is set but wandb is not "
                                          r"installed: pip install 'coach_jax\[wandb\]'"):
        resolve(config, 1)


@pytest.mark.parametrize("overrides, message", [
    ({"adapter.kind": "qlora"}, r"adapter.kind='qlora' is not one of: none, lora"),
    ({"adapter.kind": "lora", "adapter.rank": 0}, r"adapter.rank=0 must be at least 1"),
    ({"adapter.kind": "lora", "adapter.dropout": 1.0}, r"adapter.dropout=1.0 must be in"),
    ({"adapter.kind": "lora", "adapter.targets": "re:("}, r"not a valid regular expression"),
    ({"adapter.kind": "lora", "adapter.init_from": "/nowhere"}, r"no adapter_config.json"),
    ({"adapter.init_from": "/nowhere"}, r"adapter.kind='none'"),
    ({"adapter.kind": "lora", "train.freeze": ("embed",)}, r"train.freeze and"),
    ({"adapter.quantize_base": "nf4"}, r"set adapter.kind=lora \(QLoRA\)"),
    ({"adapter.kind": "lora", "adapter.layers": (-1,)}, r"adapter.layers=\(-1,\): layer"),
    ({"adapter.kind": "lora", "checkpoint.init_from": "runs/x/checkpoints"},
     r"from adapter.init_from"),
    ({"adapter.kind": "lora", "adapter.quantize_base": "fp4"}, r"not one of: none, int8"),
])
def test_adapter_settings_are_checked(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve(tiny_config(tmp_path, **overrides), 1)


def test_an_explicit_cudnn_off_a_gpu_is_refused_before_any_weight_is_read(tmp_path,
                                                                         monkeypatch):
    from coach_jax import data
    from coach_jax.train import loop

    def never(*args, **kwargs):
        raise AssertionError("the model was built")
    monkeypatch.setattr(loop, "build_model", never)
    config = tiny_config(tmp_path, **{"model.attention": "cudnn"})
    settings = resolve(config, 1)
    tokenizer = data.load_tokenizer(settings.tokenizer_path, settings.chat_template)
    with pytest.raises(ConfigError, match=r"model.attention='cudnn' needs a CUDA GPU \(this "
                                          r"platform is cpu\); use 'auto'"):
        loop.build_params(settings, tokenizer, None)


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.expert": 4, "mesh.data": -1}, None),
    ({"mesh.expert": 3, "mesh.data": -1}, r"8 devices do not divide into mesh.data x "
                                          r"mesh.fsdp x mesh.expert x mesh.tensor = -1 x 1 x 3"),
    ({"mesh.expert": -1, "mesh.data": -1}, r"at most one of mesh.data, mesh.fsdp, "
                                           r"mesh.expert, mesh.tensor may be -1"),
    ({"mesh.expert": 0}, r"mesh.expert=0: mesh sizes must be positive"),
    ({"mesh.expert": 2, "mesh.data": 2}, r"= 2 x 1 x 2 x 1 needs 4 devices; 8 are available"),
])
def test_the_mesh_is_checked_naming_its_keys(tmp_path, overrides, message):
    config = tiny_config(tmp_path, **overrides, **{"train.global_batch_size": 8})
    if message is None:
        assert resolve(config, 8).mesh_shape == (2, 1, 4, 1)
        return
    with pytest.raises(ConfigError, match=message):
        resolve(config, 8)


@pytest.mark.parametrize("experts, message", [
    (None, r"mesh.expert=2 shards the experts of a mixture, and this model has none: put "
           r"those devices on mesh.data or mesh.fsdp"),
    (3, r"mesh.expert=2 does not divide the model's 3 experts"),
])
def test_an_expert_axis_the_model_cannot_use_is_refused(experts, message):
    from coach_jax.train import loop
    cfg = models.ModelConfig(model_type="mixtral", vocab_size=64, hidden_size=32,
                             intermediate_size=64, num_layers=1, num_heads=2,
                             num_kv_heads=2, head_dim=16)
    if experts:
        cfg = dataclasses.replace(cfg, feed_forward=("moe",), moe=MoeSpec(experts, 2, 32, True))
    with pytest.raises(ConfigError, match=message):
        loop.check_expert_axis(cfg, 2)
