"""Command lines: one flag style, every flag explained, expected errors as one line with status 2."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dycon import cli, env, evaluate, experiment, plot, predict, preprocess, train
from dycon.demo import ensure_demo_data

ROOT = Path(__file__).resolve().parents[1]


def setup_py_constant(name):
    """A top-level constant of setup.py, read without running it (it would build the extension)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    return next(ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name)


CONSOLE_SCRIPTS = setup_py_constant("CONSOLE_SCRIPTS")
COMMANDS = {"evaluate": evaluate, "predict": predict, "train": train, "experiment": experiment, "plot": plot,
            "preprocess": preprocess, "env": env}


def parser():
    p = cli.ArgumentParser("python -m dycon.x", "a test command")
    p.add_argument("--labeled_bs", type=int, help="labelled volumes per batch")
    p.add_argument("--kernel-backend", help="which kernels")
    return p


@pytest.mark.parametrize("argv", [["--labeled-bs", "2"], ["--labeled_bs", "2"], ["--labeled_bs=2"],
                                  ["--labeled-bs=2"]])
def test_both_spellings_of_a_flag(argv):
    assert parser().parse_args(argv).labeled_bs == 2
    assert parser().parse_args(["--kernel_backend", "cpu"]).kernel_backend == "cpu"


def test_values_and_words_after_double_dash_are_kept():
    assert cli.normalize_flags(["--root_path", "/a_b/c_d", "--x_y=v_w", "--", "--k_l"]) == \
        ["--root-path", "/a_b/c_d", "--x-y=v_w", "--", "--k_l"]


def test_abbreviations_and_unknown_flags_are_errors(capsys):
    for argv in (["--labeled", "2"], ["--label_bs", "2"]):
        with pytest.raises(SystemExit) as exit_:
            parser().parse_args(argv)
        assert exit_.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("typo", ["--labelnm", "--label_num", "--labelnum_=4"])
def test_a_misspelled_flag_is_one_line_naming_the_closest(typo, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.build_parser().parse_args([typo, "4"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("python -m dycon.train: error: unrecognized arguments") and \
        "did you mean --labelnum?" in err, err


def test_other_usage_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--method", "nope"])
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "invalid choice: 'nope'" in err and "did you mean" not in err, err


@pytest.mark.parametrize("name", ["train", "experiment"])
def test_config_help_lists_the_shipped_configs(name):
    text = " ".join(COMMANDS[name].build_parser().format_help().split())
    assert "brats19, demo, demo_hard, isles22, la, nifti, pancreas" in text


def test_a_flag_without_help_is_refused():
    with pytest.raises(ValueError, match="--batch needs a help text"):
        parser().add_argument("--batch", type=int)
    with pytest.raises(ValueError, match="--run needs a help text"):
        parser().add_mutually_exclusive_group().add_argument("--run")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_of_every_command_has_help(name):
    p = COMMANDS[name].build_parser()
    assert isinstance(p, cli.ArgumentParser) and not p.allow_abbrev
    for action in p._actions:
        assert action.help, f"{name}: {action.option_strings} has no help"


def test_every_command_has_a_console_script():
    assert sorted(CONSOLE_SCRIPTS) == sorted(COMMANDS)


# arguments each command requires, so that a misspelled flag is the only usage error
REQUIRED_ARGS = {"evaluate": ["--run", "r"], "predict": ["--run", "r", "--input", "i", "--output", "o"],
                 "preprocess": ["--root_path", "d"], "experiment": ["--output", "g"], "plot": ["r"]}
HEAVY_MODULES = ("torch", "matplotlib", "scipy")   # each 0.5 to 5 s to import on a busy machine
# what pip's dycon-<name> script runs, with --help and then with a misspelled flag
HELP_THEN_TYPO = """
import sys
from dycon import {name}
for argv in (["--help"], {typo!r}):
    sys.argv = ["dycon-{name}", *argv]
    try:
        {name}.console_main()
    except SystemExit as exit_:
        print(exit_.code)
print(sorted(set({heavy!r}) & set(sys.modules)))
"""


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_and_usage_errors_answer_before_torch(name):
    """dycon-<name> (and python -m dycon.<name>, the same imports) answers --help and a misspelled
    flag before torch, matplotlib or scipy is imported; the error is one line naming the closest flag."""
    code = HELP_THEN_TYPO.format(name=name, typo=[*REQUIRED_ARGS.get(name, []), "--debgu"], heavy=HEAVY_MODULES)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    # exit statuses of --help and of the typo, then the heavy modules imported
    assert proc.stdout.strip().splitlines()[-3:] == ["0", "2", "[]"], proc.stdout[-500:] + proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {COMMANDS[name].PROG}"), proc.stdout[:200]
    assert proc.stderr.strip().splitlines() == [
        f"{COMMANDS[name].PROG}: error: unrecognized arguments: --debgu; --debgu: did you mean --debug? "
        "(--help lists the flags)"], proc.stderr


def run_command(name, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run(COMMANDS[name].main, COMMANDS[name].PROG, argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"python -m dycon.{name}: error: "), err
    return err


@pytest.fixture
def garbage_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a checkpoint")
    return path


def test_evaluate_bad_inputs_are_one_line(tmp_path, garbage_checkpoint, capsys):
    assert "checkpoint not found" in run_command("evaluate", ["--checkpoint", str(tmp_path / "none.pt")], capsys)
    assert "checkpoint not found" in run_command("evaluate", ["--run", str(tmp_path)], capsys)
    assert "cannot read checkpoint" in run_command("evaluate", ["--checkpoint", str(garbage_checkpoint)], capsys)


def test_predict_bad_inputs_are_one_line(tmp_path, garbage_checkpoint, capsys):
    out = tmp_path / "out"
    ckpt = ["--checkpoint", str(garbage_checkpoint), "--output", str(out)]
    assert "does not exist" in run_command("predict", [*ckpt, "--input", str(tmp_path / "none.nii.gz")], capsys)
    (tmp_path / "notes.txt").write_text("x")
    assert "unsupported file type" in run_command("predict", [*ckpt, "--input", str(tmp_path / "notes.txt")], capsys)
    (tmp_path / "case.h5").write_bytes(b"")
    assert "cannot read checkpoint" in run_command("predict", [*ckpt, "--input", str(tmp_path / "case.h5")], capsys)
    assert not out.exists()   # nothing written before the inputs are checked


def test_train_bad_inputs_are_one_line_and_make_no_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    out = ["--output", str(run)]
    assert "config 'nosuch' not found" in run_command("train", ["--config", "nosuch", *out], capsys)
    # a mistyped root is an error for the demo too (no new data set generated there)
    assert "--generate-demo" in run_command("train", ["--root_path", str(tmp_path / "typo"), *out], capsys)
    assert "does not exist" in run_command("train", ["--config", "brats19", "--root_path", str(tmp_path / "no"),
                                                     *out], capsys)
    assert "labeled_bs" in run_command("train", ["--labeled-bs", "9", "--batch_size", "4", *out], capsys)
    assert not run.exists() and not (tmp_path / "typo").exists()
    with pytest.raises(SystemExit) as exit_:
        cli.run(train.main, train.PROG, ["--max_iter", "3"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("device,gpus,message", [("cuda", 0, "--device cuda: no CUDA GPU is visible (torch "),
                                                 ("cuda:2", 2, "--device cuda:2: only 2 CUDA GPU(s) are visible"),
                                                 ("gpu", 0, "--device gpu: not a device name")])
def test_a_device_torch_cannot_use_fails_before_the_run_directory(device, gpus, message, tmp_path, monkeypatch,
                                                                  capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    run = tmp_path / "run"
    assert message in run_command("train", ["--device", device, "--output", str(run)], capsys)
    assert not run.exists()
    # evaluate and predict say the same before they read the checkpoint
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert message in run_command("evaluate", ["--checkpoint", str(garbage), "--device", device], capsys)
    out, case = tmp_path / "predictions", tmp_path / "case.h5"
    case.write_bytes(b"")   # a file of a type predict reads: the device is checked next
    assert message in run_command("predict", ["--checkpoint", str(garbage), "--device", device, "--input",
                                              str(case), "--output", str(out)], capsys)
    assert not out.exists()


@pytest.mark.parametrize("name", ["evaluate", "predict"])
def test_evaluate_and_predict_take_device_auto_as_train_does(name, tmp_path, monkeypatch):
    """``--device auto`` (train's default, and what the error above suggests) loads the model on
    the GPU where torch sees one, else the CPU, rather than asking torch.load for device 'auto'."""
    import torch
    from dycon.networks import build_model

    model_cfg = dict(arch="unet3d", in_channels=1, num_classes=2, base_filters=2, embed_dim=8, feature_scaler=2)
    checkpoint = tmp_path / "model.pt"
    torch.save({"student": build_model(model_cfg).state_dict(), "config": {"model": model_cfg}}, checkpoint)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    flags = ["--input", str(tmp_path), "--output", str(tmp_path / "o")] if name == "predict" else []
    args = COMMANDS[name].build_parser().parse_args(["--checkpoint", str(checkpoint), "--device", "auto", *flags])
    path, model, _ = evaluate.load_model_of(args)
    assert path == checkpoint and args.device == "cpu" and next(model.parameters()).device.type == "cpu"


def test_labelnum_beyond_the_training_cases_fails_before_the_run_directory(tmp_path, capsys):
    root = ensure_demo_data(tmp_path / "demo", size=32, splits={"train": 3, "val": 1, "test": 1})
    run = tmp_path / "run"
    err = run_command("train", ["--root_path", str(root), "--labelnum", "200", "--output", str(run)], capsys)
    assert "between 1 and the 3 training cases, got 200" in err and not run.exists()


def test_bugs_keep_their_traceback_and_debug_shows_every_one(tmp_path, monkeypatch):
    def broken(argv):
        raise ValueError("raised outside dycon's own code")   # this file is not the project's code
    with pytest.raises(ValueError):
        cli.run(broken, "python -m dycon.x", [])
    with pytest.raises(FileNotFoundError):
        cli.run(evaluate.main, evaluate.PROG, ["--checkpoint", str(tmp_path / "none.pt"), "--debug"])


def test_experiment_plot_and_preprocess_bad_inputs_are_one_line(tmp_path, capsys):
    assert "does not exist" in run_command("preprocess", ["--root-path", str(tmp_path / "none")], capsys)
    assert "metrics" in run_command("plot", [str(tmp_path)], capsys)
    assert "unknown config key" in run_command(
        "experiment", ["--methods", "dycon", "--set", "loss.nope=1", "--output", str(tmp_path / "g")], capsys)


@pytest.mark.parametrize("name,flags", [("evaluate", []), ("predict", ["--input", ".", "--output", "o"])])
def test_python_dash_m_reports_one_line(name, flags, tmp_path):
    proc = subprocess.run([sys.executable, "-m", f"dycon.{name}", "--checkpoint", "none.pt", *flags],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})   # this checkout, not an installed one
    assert proc.returncode == 2 and proc.stderr.startswith(f"python -m dycon.{name}: error: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("load,expected", [(0.2, 4), (1.0, 3), (2.6, 1), (9.0, 1)])
def test_threads_follow_the_idle_cores(monkeypatch, load, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (load, 0.0, 0.0))
    n, note = cli.choose_threads()
    assert n == expected and (("busy" in note) == (expected < 4)), note


def test_threads_flag_then_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli.choose_threads(2)[0] == 2
    assert cli.choose_threads()[0] == 3
    with pytest.raises(cli.UsageError, match="at least 1"):
        cli.choose_threads(0)


def test_train_records_its_thread_count_and_generates_the_demo_only_when_asked(tmp_path, monkeypatch):
    from dycon import loop

    seen = {}
    monkeypatch.setattr(loop, "train", lambda cfg, run_dir, resume, threads_note:
                        seen.update(threads=cfg["train"]["threads"], note=threads_note))
    root, run = tmp_path / "demo", tmp_path / "run"
    train.main(["--root_path", str(root), "--generate-demo", "--threads", "2", "--no-test", "--output", str(run)])
    assert (root / "demo_version.txt").is_file()
    assert seen == {"threads": 2, "note": "torch threads: 2 (--threads / train.threads)"}
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["threads"] == 2


def test_dycon_env_exits_with_the_reports_status_through_the_common_runner(monkeypatch):
    """dycon-env runs like every command (cli.run: one-line errors, --debug) and still exits 1
    when the report finds no fused kernels on a device."""
    import dycon_kernels.__main__ as report
    from dycon import env
    monkeypatch.setattr(report, "main", lambda: 1)
    monkeypatch.setattr(sys, "argv", ["dycon-env"])
    assert env.console_main() == 1
    monkeypatch.setattr(sys, "argv", ["dycon-env", "--debug"])
    assert env.console_main() == 1
