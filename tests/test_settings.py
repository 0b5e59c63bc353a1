"""One source of truth per setting: the train flags are TrainConfig's fields (same names, same defaults), bit widths
come from one constant each, and TrainConfig's quantization settings are checked by QuantConfig itself."""

import argparse
from dataclasses import fields

import pytest
from test_cli import _subparsers

from tuneqdm.cli import build_parser, train_settings
from tuneqdm.errors import TuneQDMError, either
from tuneqdm.ptq.config import ACTIVATION_BITS, ATTENTION_MODES, GROUP_CHOICES
from tuneqdm.quant.packing import SUPPORTED_BITS
from tuneqdm.train import TrainConfig
from tuneqdm.tuning.config import METHODS, QuantConfig


def test_every_train_flag_is_a_trainconfig_field_with_the_same_default():
    settings = train_settings(build_parser().parse_args(["train"]))
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    assert settings == defaults


def test_a_flag_without_a_field_is_refused_not_dropped():
    args = argparse.Namespace(command="train", func=None, instance_data_dir="photos", no_such_setting=1)
    assert train_settings(args) == {"instance_data_dir": "photos", "no_such_setting": 1}
    with pytest.raises(TypeError, match="no_such_setting"):
        TrainConfig(**train_settings(args))


def test_bits_flags_take_their_choices_from_the_one_constant():
    seen = 0
    for words, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if action.dest == "bits" and action.choices is not None:
                assert action.choices is SUPPORTED_BITS, words
                seen += 1
            if action.dest == "attention_quant":
                assert action.choices is ATTENTION_MODES, words
    assert seen == 3  # train, demo, benchmark fidelity (quantize checks its --bits in CalibrationConfig)


@pytest.mark.parametrize("method", ["tuneqdm", "fp", "lora"])
def test_trainconfig_bits_and_init_are_checked_by_quantconfig(method):
    with pytest.raises(TuneQDMError, match=r"^unsupported bit width 3: choose one of 2, 4 or 8$"):
        TrainConfig(method=method, bits=3, instance_data_dir="photos")
    with pytest.raises(TuneQDMError, match=r"^unknown quantizer init 'absmax': choose 'minmax' or 'mse'$"):
        TrainConfig(method=method, quant_init="absmax", instance_data_dir="photos")


def test_trainconfig_builds_the_quantconfig_it_trains_with():
    cfg = TrainConfig(method="s1", s1_intervals="0-250", bits=2, quant_init="minmax", instance_data_dir="photos")
    qc = cfg.quant_config(1000)
    assert (qc.method, qc.bits, qc.init, qc.experts, qc.intervals) == ("s1", 2, "minmax", 1, ((0, 250),))
    qlora = TrainConfig(method="qlora", instance_data_dir="photos").quant_config(1000)
    assert (qlora.method, qlora.experts) == ("peqa", 1)


def test_choices_are_named_in_messages_from_the_same_constants():
    assert either(SUPPORTED_BITS) == "2, 4 or 8"
    assert either(ACTIVATION_BITS) == "6 or 8"
    assert either(GROUP_CHOICES) == "1, 2, 8 or 16"
    assert either(["x"]) == "x"


def _refused(make, **kwargs) -> bool:
    try:
        make(**kwargs)
    except TuneQDMError:
        return True
    return False


@pytest.mark.parametrize("method", list(METHODS))
def test_the_cli_and_quant_config_refuse_the_same_numbers_of_experts(method):
    """One rule (tuning.config.experts_problem) in two wordings: --experts is refused exactly when QuantConfig is."""
    s1 = method == "s1"
    for k in range(-1, 6):
        train = _refused(TrainConfig, instance_data_dir="photos", method=method, experts=k,
                         s1_intervals="0-250" if s1 else None)
        quant = _refused(QuantConfig, method=method, experts=k, intervals=((0, 250),) if s1 else ())
        assert train == quant, (method, k)
