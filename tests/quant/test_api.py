"""quantize_ dispatch and the calibration protocol, coverage on the full-size architecture, config (de)serialisation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from qvggt.model import build_model, get_preset
from qvggt.quant.api import (
    QuantizeHandler,
    needs_calibration,
    quantize_,
    register_quantize_handler,
    registered_configs,
)
from qvggt.quant.config import (
    Coverage,
    QuantConfig,
    RTNConfig,
    config_from_dict,
    weight_activation_formats,
)
from qvggt.quant.coverage import select_linears
from qvggt.quant.formats import parse_format

# ---------------------------------------------------------------------------------------------------------------
# coverage on vggt-1b (meta device: no memory)


@pytest.fixture(scope="module")
def vggt_1b_meta() -> nn.Module:
    return build_model(get_preset("vggt-1b"), "meta")


def test_default_coverage_is_the_192_aggregator_block_linears(vggt_1b_meta: nn.Module) -> None:
    selected = select_linears(vggt_1b_meta)
    expected = {
        f"aggregator.{kind}_blocks.{i}.{layer}"
        for kind in ("frame", "global")
        for i in range(24)
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert len(selected) == 192 and set(selected) == expected
    assert all(type(m) is nn.Linear for m in selected.values())
    shapes = {tuple(selected[f"aggregator.global_blocks.7.{n}"].weight.shape) for n in ("attn.qkv", "mlp.fc2")}
    assert shapes == {(3072, 1024), (1024, 4096)}


def test_full_coverage_includes_heads_and_convs(vggt_1b_meta: nn.Module) -> None:
    full = select_linears(vggt_1b_meta, Coverage.FULL)
    assert set(select_linears(vggt_1b_meta)) < set(full)
    for name, kind in [
        ("aggregator.patch_embed.patch_embed.proj", nn.Conv2d),  # DINOv2 patch conv
        ("aggregator.patch_embed.blocks.0.attn.qkv", nn.Linear),  # encoder
        ("camera_head.embed_pose", nn.Linear),
        ("camera_head.poseLN_modulation.1", nn.Linear),
        ("camera_head.trunk.3.mlp.fc2", nn.Linear),
        ("depth_head.scratch.output_conv2.2", nn.Conv2d),
        ("point_head.resize_layers.0", nn.ConvTranspose2d),
        ("track_head.tracker.updateformer.time_blocks.0.attn.out_proj", nn.Linear),
    ]:
        assert type(full[name]) is kind, name
    every = [n for n, m in vggt_1b_meta.named_modules() if type(m) in (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)]
    assert list(full) == every
    assert not any("in_proj" in n for n in full)  # bare parameters, documented as left in full precision
    with pytest.raises(ValueError, match="'default', 'full'"):
        select_linears(vggt_1b_meta, "everything")


# ---------------------------------------------------------------------------------------------------------------
# registry and calibration protocol


@dataclass(frozen=True, kw_only=True, eq=False)
class UnregisteredConfig(QuantConfig):
    pass


@dataclass(frozen=True, kw_only=True, eq=False)
class CountingConfig(QuantConfig):
    """A test-only calibrated method: counts the calibration rows reaching each Linear, then scales its bias."""

    fail_in_convert: bool = False


@register_quantize_handler(CountingConfig)
class CountingHandler(QuantizeHandler):
    needs_calibration = True
    log: list[str] = []  # noqa: RUF012 - test instrumentation shared by the class

    def prepare(self, model: nn.Module, config: QuantConfig, filter_fn: Any = None) -> dict[str, Any]:
        self.log.append("prepare")
        counts: dict[str, int] = {}
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and (filter_fn is None or filter_fn(m, name)):
                counts[name] = 0

                def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                    assert not torch.is_grad_enabled() and not mod.training
                    counts[name] += args[0].shape[0]

                hooks.append(m.register_forward_pre_hook(hook))
        return {"counts": counts, "hooks": hooks}

    def convert(self, model: nn.Module, config: QuantConfig, state: Any, filter_fn: Any = None) -> nn.Module:
        assert isinstance(config, CountingConfig)
        self.log.append("convert")
        if config.fail_in_convert:
            raise RuntimeError("boom")
        model.calibration_counts = dict(state["counts"])
        return model

    def release(self, model: nn.Module, state: Any) -> None:
        self.log.append("release")
        for h in state["hooks"]:
            h.remove()


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).train()


def test_unknown_config_type_lists_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"UnregisteredConfig.*RTNConfig"):
        quantize_(small_net(), UnregisteredConfig())
    with pytest.raises(TypeError, match="QuantConfig instance.*registered configs"):
        quantize_(small_net(), {"_type": "RTNConfig"})  # type: ignore[arg-type]
    assert {"RTNConfig", "CountingConfig"} <= set(registered_configs())


def test_registration_rejects_bad_targets_and_conflicts() -> None:
    with pytest.raises(TypeError):
        register_quantize_handler(dict)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        register_quantize_handler(UnregisteredConfig)(object)  # type: ignore[type-var]

    class OtherHandler(QuantizeHandler):
        def convert(self, model: nn.Module, config: QuantConfig, state: Any, filter_fn: Any = None) -> nn.Module:
            return model

    with pytest.raises(ValueError, match="already has handler"):
        register_quantize_handler(CountingConfig)(OtherHandler)


def test_calibrated_method_runs_prepare_data_convert_release() -> None:
    CountingHandler.log.clear()
    net = small_net()
    batches = [torch.randn(3, 4), (torch.randn(5, 4),)]
    out = quantize_(net, CountingConfig(), filter_fn=lambda m, n: n == "0", calibration_data=batches)
    assert out is net and net.calibration_counts == {"0": 8}
    assert CountingHandler.log == ["prepare", "convert", "release"]
    assert net.training  # training flag restored after calibrating in eval mode
    assert not net[0]._forward_pre_hooks  # hooks removed
    assert needs_calibration(CountingConfig()) and not needs_calibration(RTNConfig())


def test_calibration_errors_are_clear_and_clean_up() -> None:
    net = small_net()
    with pytest.raises(ValueError, match="CountingConfig needs calibration data"):
        quantize_(net, CountingConfig())
    with pytest.raises(ValueError, match="yielded no batch"):
        quantize_(net, CountingConfig(), calibration_data=[])
    with pytest.raises(ValueError, match="RTNConfig takes no calibration data"):
        quantize_(net, RTNConfig(coverage="full"), calibration_data=[torch.randn(1, 4)])
    CountingHandler.log.clear()
    with pytest.raises(RuntimeError, match="boom"):
        quantize_(net, CountingConfig(fail_in_convert=True), calibration_data=[torch.randn(1, 4)])
    assert CountingHandler.log[-1] == "release" and not net[0]._forward_pre_hooks
    with pytest.raises(TypeError, match="calibration batches"):
        quantize_(net, CountingConfig(), calibration_data=[3])
    assert not net[0]._forward_pre_hooks


def test_rtn_is_found_without_importing_its_module_first() -> None:
    net = quantize_(small_net(), RTNConfig(coverage="full"))
    assert type(net[0]).__name__ == "QuantLinear"


# ---------------------------------------------------------------------------------------------------------------
# configs


def test_config_dict_round_trip_through_json() -> None:
    w, a = weight_activation_formats(4, 8, group_size=128)
    config = RTNConfig(
        weight=w,
        activation=a,
        coverage="full",
        layer_overrides={"aggregator.global_blocks.23.*": 8, "camera_head.*": None, "x": "fp8_e4m3-channel"},
        clip_search=True,
    )
    d = config.to_dict()
    assert d["_type"] == "RTNConfig" and d["weight"] == "int4-sym-group128" and d["coverage"] == "full"
    assert d["layer_overrides"]["aggregator.global_blocks.23.*"] == "int8-sym-group128"
    back = config_from_dict(json.loads(json.dumps(d)))
    assert back == config and hash(back) == hash(config) and back.to_dict() == d
    assert back.weight == w and back.coverage is Coverage.FULL and back.layer_overrides["camera_head.*"] is None
    assert config_from_dict({"_type": "RTNConfig"}) == RTNConfig()  # _module optional, defaults fill in
    assert RTNConfig() != RTNConfig(clip_search=True)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"_type": "Linear", "_module": "torch.nn"}, "only loaded from"),
        ({"_type": "system", "_module": "os"}, "only loaded from"),
        ({"_type": "RTNHandler", "_module": "qvggt.quant.rtn"}, "not a QuantConfig subclass"),
        ({"_type": "QuantFormat"}, "not a QuantConfig subclass"),
        ({"_type": "QuantConfig"}, "not a QuantConfig subclass"),
        ({"weight": "int8-sym-channel"}, "no '_type'"),
        ({"_type": "RTNConfig", "wieght": "int8-sym-channel"}, r"unknown RTNConfig fields \['wieght'\]"),
        ({"_type": "RTNConfig", "version": 2}, "version=2 is not supported"),
        ({"_type": "RTNConfig", "coverage": "most"}, "coverage='most'"),
    ],
)
def test_config_from_dict_refuses(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config_from_dict(data)


def test_format_helper_and_config_validation() -> None:
    assert [f.name for f in weight_activation_formats(8, 8, fp8=True)] == ["fp8_e4m3-channel", "fp8_e4m3-token"]
    assert [getattr(f, "name", f) for f in weight_activation_formats(4, None)] == ["int4-sym-channel", None]
    assert weight_activation_formats(3, 6)[1] == parse_format("int6-sym-token")
    with pytest.raises(ValueError, match="fp8 e4m3 is an 8-bit format"):
        weight_activation_formats(4, 4, fp8=True)
    with pytest.raises(ValueError, match="fp8 e4m3 is an 8-bit format"):
        weight_activation_formats(8, 4, fp8=True)
    with pytest.raises(ValueError, match="group_size"):
        weight_activation_formats(4, 8, group_size=0)
    with pytest.raises(ValueError, match="out of range"):
        weight_activation_formats(9, 8)
    with pytest.raises(ValueError, match="RTNConfig.activation=int8-sym-channel"):
        RTNConfig(activation="int8-sym-channel")
    with pytest.raises(ValueError, match="RTNConfig.weight=int8-sym-token"):
        RTNConfig(weight="int8-sym-token")
    with pytest.raises(ValueError, match=r"layer_overrides\['a'\]=4"):
        RTNConfig(weight="fp8_e4m3-channel", layer_overrides={"a": 4})  # no 4-bit fp8
    with pytest.raises(ValueError, match="clip_search"):
        RTNConfig(clip_search="yes")  # type: ignore[arg-type]
    overrides = {"a": 4}
    config = RTNConfig(layer_overrides=overrides)
    overrides["b"] = 2  # the config keeps its own copy
    assert set(config.layer_overrides) == {"a"}
