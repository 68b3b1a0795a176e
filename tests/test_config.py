import argparse

import pytest

import config


def option_flags(script):
    return {a.option_strings[0] for a in config.build_parser(script)._actions if a.option_strings} - {"-h"}


def test_each_script_lists_only_its_options():
    train, test, inference = (option_flags(s) for s in config.SCRIPTS)
    shared = {"--gpu_num", "--experiment_name", "--network", "--num_anchor", "--cascade", "--model_version"}
    assert shared <= train & test & inference
    assert {"--epochs", "--im_size", "--landmark_loss"} <= train - test - inference
    assert {"--inference_dir", "--save_img", "--mask", "--save_mask", "--infer_imsize_same",
            "--inference_save_folder"} <= inference - train - test
    assert {"--pred_dir", "--gt_dir", "--tta"} <= test - inference
    assert {"--model_weight", "--weights"} <= test & inference


def test_script_specific_defaults():
    assert config.parse_args("train", []).batch_size == 16
    assert config.parse_args("inference", []).batch_size == 1
    assert config.parse_args("test", []).confidence_threshold == 0.02
    assert config.parse_args("test", []).nms_threshold == 0.4
    assert config.parse_args("inference", []).confidence_threshold == 0.5
    assert config.parse_args("inference", []).nms_threshold == 0.3


def test_booleans_and_architecture_overrides():
    args = config.parse_args("inference", ["--cascade", "False", "--save_img", "true", "--network", "mobilenet0.25"])
    assert args.cascade is False and args.save_img is True
    assert config.architecture_overrides(args) == {"network": "mobilenet0.25", "cascade": False}


@pytest.mark.parametrize("script,argv,message", [
    ("train", ["--cascade", "maybe"], "expected true or false"),
    ("train", ["--num_anchor", "4"], "invalid choice"),
    ("test", ["--confidence_threshold", "1.5"], "expected a number in [0, 1]"),
    ("inference", ["--device", "gpu"], "expected cpu, cuda or cuda:N"),
    ("inference", ["--batch_size", "0"], "expected a positive integer"),
    ("inference", ["--epochs", "3"], "unrecognized arguments"),
])
def test_bad_values_are_rejected_with_a_clear_message(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        config.parse_args(script, argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_str2bool():
    assert config.str2bool("TRUE") is True and config.str2bool("no") is False
    with pytest.raises(argparse.ArgumentTypeError):
        config.str2bool("2")
