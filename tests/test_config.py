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
    ("inference", ["--batch_size", "1.5"], "argument --batch_size: expected a positive integer, got '1.5'"),
    ("train", ["--workers", "two"], "argument --workers: expected an integer >= 0, got 'two'"),
    ("train", ["--im_size", "big"], "argument --im_size: expected an integer >= 32"),
    ("test", ["--confidence_threshold", "abc"],
     "argument --confidence_threshold: expected a number in [0, 1], got 'abc'"),
    ("test", ["--confidence_threshold", "nan"], "expected a number in [0, 1], got 'nan'"),
    ("inference", ["--epochs", "3"], "unrecognized arguments"),
    ("test", ["--tta_scales", "abc"], "expected comma-separated integers >= 0"),
    ("test", ["--tta_scales=-5,0"], "expected comma-separated integers >= 0"),
    ("train", ["--im_size", "31"], "expected an integer >= 32"),
    ("train", ["--experiment_name", "../../escape"], "expected a folder name without '/'"),
    ("inference", ["--experiment_name", "a/b"], "expected a folder name without '/'"),
    ("test", ["--experiment_name", " "], "expected a folder name"),
])
def test_bad_values_are_rejected_with_a_clear_message(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        config.parse_args(script, argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("script,argv,message", [
    ("test", ["--weights", "w.pth", "--model_weight", "best.pth"], "give either --weights or --model_weight"),
    ("inference", ["--weights", "w.pth", "--model_weight", "best.pth", "--inference_dir", "x"],
     "give either --weights or --model_weight"),
    ("inference", ["--weights", "w.pth"], "no input: pass --inference_dir"),
    ("test", ["--pred_dir", ""], "--pred_dir is empty"),
    ("test", ["--weights", "w.pth", "--results_json", " "], "--results_json is empty"),
    # an empty path would mean "not given": a resume would start a new run, --weights "" another checkpoint
    ("train", ["--resume", ""], "--resume is empty"),
    ("train", ["--init_weights", " "], "--init_weights is empty"),
    ("train", ["--train_split", ""], "--train_split is empty"),
    ("train", ["--val_dataset", ""], "--val_dataset is empty"),
    ("inference", ["--weights", "", "--inference_dir", "x"], "--weights is empty"),
    ("test", ["--model_weight", ""], "--model_weight is empty"),
    ("train", ["--pretrained", "false", "--backbone_weights", "b.tar"],
     "--backbone_weights loads ImageNet weights and --pretrained false asks for none"),
    ("train", ["--compile_augment", "true"], "--compile_augment true compiles the pixel work of --augment_on device"),
    # another script's option: which script takes it, and what this one takes instead for the usual mix-ups
    ("train", ["--weights", "w.pth"], "unrecognized arguments: --weights w.pth (--weights is an option of test.py and "
                                      "inference.py; here --init_weights PATH fine-tunes a checkpoint, --resume PATH"),
    ("test", ["--resume=w.pth"], "(--resume is an option of train.py; here --weights PATH or --model_weight FILE"),
    ("inference", ["--inference_dir", "x", "--epochs", "3"], "--epochs 3 (--epochs is an option of train.py) (see"),
    # the public Pytorch_Retinaface scripts' options: what takes their place
    ("train", ["--training_dataset", "data/widerface/train/label.txt"],
     "(--training_dataset is Pytorch_Retinaface's; here: --dataset DIR (the folder holding train/label.txt"),
    ("train", ["--network", "mobile0.25"], "(Pytorch_Retinaface's mobile0.25 is mobilenet0.25 here) (see --help)"),
    ("test", ["--trained_model", "w.pth", "--cpu"], "(--trained_model is Pytorch_Retinaface's; here: --weights PATH"),
    ("inference", ["--inference_dir", "x", "--cpu"], "(--cpu is Pytorch_Retinaface's; here: --device cpu)"),
])
def test_option_combinations_exit_2_with_one_line_before_any_work(script, argv, message, capsys, tmp_path,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)

    def must_not_run(args):
        raise AssertionError("the run started")

    assert config.run_command_line(script, argv, must_not_run, ()) == config.EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}.py: error: ") and message in lines[0], lines


@pytest.mark.parametrize("script", ["test", "inference"])
def test_top_k_options_take_all_or_zero_for_no_limit(script, capsys):
    """--top_k / --keep_top_k: a count, or 0 / all for no cut, which the detector receives as None;
    under test.py --tta an absent --keep_top_k keeps insightface's 750 merged boxes, 0 keeps all."""
    from utils.tta import MAX_MERGED, merged_box_limit

    extra = ["--inference_dir", "x"] if script == "inference" else []
    args = config.build_parser(script).parse_args(extra + ["--top_k", "all", "--keep_top_k", "0"])
    assert (args.top_k, args.keep_top_k) == (0, 0)
    assert config.detection_limit(args.top_k) is None and config.detection_limit(args.keep_top_k) is None
    assert config.detection_limit(40) == 40 and config.detection_limit(None) is None
    with pytest.raises(SystemExit):
        config.build_parser(script).parse_args(extra + ["--keep_top_k", "-1"])
    assert "an integer >= 0 or all" in capsys.readouterr().err
    assert (merged_box_limit(None), merged_box_limit(0), merged_box_limit(40)) == (MAX_MERGED, None, 40)


def test_str2bool():
    assert config.str2bool("TRUE") is True and config.str2bool("no") is False
    with pytest.raises(argparse.ArgumentTypeError):
        config.str2bool("2")


@pytest.mark.parametrize("argv,message", [
    (["--lr", "-1"], "argument --lr: expected a finite number >= 0, got '-1'"),
    (["--lr", "-1e-3"], "argument --lr: expected one argument (a negative value is written --lr=-1e-3)"),
    (["--lr", "--momentum", "0.5"], "argument --lr: expected one argument (see --help)"),
    (["--lr", "nan"], "argument --lr: expected a finite number >= 0, got 'nan'"),
    (["--lr", "inf"], "argument --lr: expected a finite number >= 0, got 'inf'"),
    (["--lr", "fast"], "argument --lr: expected a number >= 0, got 'fast'"),
    (["--momentum", "-3"], "argument --momentum: expected a number in [0, 1), got '-3'"),
    (["--momentum", "1"], "argument --momentum: expected a number in [0, 1), got '1'"),
    (["--weight_decay", "-1"], "argument --weight_decay: expected a finite number >= 0, got '-1'"),
    (["--warmup_epochs", "nan"], "argument --warmup_epochs: expected a finite number >= 0, got 'nan'"),
    (["--lr_steps", "abc"], "argument --lr_steps: expected comma-separated positive epochs"),
    (["--lr_steps", "5,-1"], "argument --lr_steps: expected comma-separated positive epochs"),
    (["--lr_steps", "0,10"], "argument --lr_steps: expected comma-separated positive epochs"),
    (["--compile", "max autotune"], "argument --compile: expected true, false or a torch.compile backend name"),
])
def test_bad_training_numbers_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    import train

    monkeypatch.chdir(tmp_path)  # nothing may be created: the options are refused before any work
    assert train.main(["--dataset", str(tmp_path / "absent"), *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and message in lines[0], lines
    assert not (tmp_path / "experiments").exists()


def test_training_numbers_that_are_accepted():
    args = config.parse_args("train", ["--lr", "0", "--momentum", "0", "--weight_decay", "0", "--warmup_epochs",
                                       "0.5", "--lr_steps", " 20, 10"])
    assert (args.lr, args.momentum, args.weight_decay, args.warmup_epochs) == (0.0, 0.0, 0.0, 0.5)
    assert args.lr_steps == "10,20"  # sorted, as a plain string (what checkpoints record)
    assert config.parse_args("train", []).lr_steps is None
    compile_settings = {value: config.parse_args("train", ["--compile", value]).compile
                        for value in ("true", "False", "aot_eager")}
    assert compile_settings == {"true": "inductor", "False": None, "aot_eager": "aot_eager"}
    assert config.parse_args("train", []).compile is None


def test_help_states_each_default_once_as_written():
    for script in config.SCRIPTS:
        text = " ".join(config.build_parser(script).format_help().split())
        assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
        assert text.count("(default: 0) (default: 0)") == 0
    text = " ".join(config.build_parser("inference").format_help().split())
    assert "--save_img SAVE_IMG write images with boxes, scores and landmarks drawn to result_images/ (default: false)" in text
    assert "--gpu_num GPU_NUM CUDA device index used when CUDA is available (default: 0)" in text
    assert config.parse_args("test", ["--tta_scales", "0,500"]).tta_scales == "0,500"
