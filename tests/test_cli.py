"""`maskaq quantize`, `maskaq synthesize`, `maskaq eval`, `maskaq export` and `maskaq demo` end to end,
bad input -> exit 2 before any work, finished runs kept, stopped runs continued, one vocabulary."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskaq.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
        json.dumps(dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=24, depth=2, num_heads=3))]


def test_quantize_end_to_end(tmp_path, capsys):
    out = tmp_path / "w4a4"
    rc = main(["quantize", *TINY, "--wbits", "4", "--abits", "4", "--method", "maskaq", "--preset", "quick",
               "--data", "fashion-mnist", "--limit", "32", "--out", str(out), "--set", "qat_epochs=1"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "maskaq" and report["wbits"] == 4 and report["abits"] == 4
    assert report["config"]["qat"]["qat_epochs"] == 1
    assert 0.0 <= report["val"]["quantized"]["top1"] <= 100.0
    assert (out / "synthetic.png").stat().st_size > 0
    assert any((out / "model").iterdir())
    printed = capsys.readouterr().out
    assert "top-1" in printed and str(out / "report.json") in printed
    # the saved student reloads into the same architecture
    from maskaq import zoo
    from maskaq.quant import load_quantized
    teacher = zoo.create("vit_tiny_patch16_224", **json.loads(TINY[3]))
    qmodel = load_quantized(out / "model", teacher)
    assert qmodel(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_synthesize_end_to_end(tmp_path):
    from maskaq.synthesis.io import load_synthetic_set
    out = tmp_path / "imgs"
    rc = main(["synthesize", *TINY, "--method", "maskaq", "--preset", "quick", "--num-images", "6",
               "--synth-batch-size", "3", "--iters", "2", "--out", str(out)])
    assert rc == 0
    images = load_synthetic_set(out / "images.safetensors")
    assert images.images.shape == (6, 1, 28, 28) and images.labels.shape == (6,)
    assert (out / "grid.png").is_file()
    assert json.loads((out / "report.json").read_text())["nan_retries"] == 0


def test_demo_quick_end_to_end(tmp_path, capsys):
    from maskaq import zoo
    if "vit_fmnist" not in zoo.available():
        pytest.skip("the bundled teacher maskaq/zoo/vit_fmnist.safetensors is not there yet")
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "quick", "--limit", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vit_fmnist_outliers on Fashion-MNIST" in printed and "full precision" in printed
    assert all(f"W4A4 {m} " in printed for m in ("ptq", "gaussian", "maskaq"))
    assert "The data decides here" in printed
    summary = json.loads((out / "demo.json").read_text())
    from maskaq.data import DEBIAN_FMNIST_ROOT
    real = {"real"} if (DEBIAN_FMNIST_ROOT / "train-images-idx3-ubyte.gz").is_file() else set()
    assert set(summary["methods"]) == {"ptq", "gaussian", "maskaq"} | real and summary["teacher"] == "vit_fmnist_outliers"
    assert (out / "maskaq_images.png").is_file() and (out / "gaussian_images.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["quantize", *TINY, "--method", "maskqa", "--out", "x"], "unknown method"),
    (["quantize", *TINY, "--wbits", "9", "--out", "x"], "--wbits must be between 2 and 8"),
    (["quantize", *TINY, "--abits", "1", "--out", "x"], "--abits must be between 2 and 8"),
    (["quantize", *TINY, "--checkpoint", "/no/such/file.pth", "--out", "x"], "does not exist"),
    (["quantize", "--model", "no_such_model_xyz", "--out", "x"], "unknown model"),
    (["quantize", *TINY, "--preset", "fast", "--out", "x"], "unknown preset"),
    (["quantize", *TINY, "--set", "synth_iter=3", "--out", "x"], "unknown setting"),
    (["quantize", *TINY, "--method", "real", "--out", "x"], "--train"),
    (["synthesize", *TINY, "--method", "real", "--out", "x"], "unknown method"),
    (["synthesize", *TINY, "--iters", "0", "--out", "x"], "--iters must be >= 1"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys, tmp_path):
    argv = [a if a != "x" else str(tmp_path / "x") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()


def test_bad_input_exit_status_from_a_real_process(tmp_path):
    code = "import sys; from maskaq.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code, "quantize", *TINY, "--wbits", "1",
                           "--out", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["maskaq quantize: error: --wbits must be between 2 and 8, got 1"]


def test_a_subcommand_imports_only_its_own_module():
    import subprocess
    import sys
    code = ("import sys; from maskaq.cli import main\n"
            "try:\n    main(['export', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('maskaq.commands.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = out.strip().splitlines()[-1]
    assert "maskaq.commands.export" in loaded
    for other in ("bench", "demo", "train_teacher", "quantize"):
        assert f"maskaq.commands.{other}'" not in loaded, loaded


def test_set_values_parse_true_false_and_none_in_any_case():
    from maskaq.commands.common import parse_override
    assert parse_override("use_entropy=false") == ("use_entropy", False)  # not the truthy string "false"
    assert parse_override("use-entropy=TRUE") == ("use_entropy", True)
    assert parse_override("refresh_every=None") == ("refresh_every", None)
    assert parse_override("qat_lr=1e-4") == ("qat_lr", 1e-4)
    assert parse_override("weight_method=minmax") == ("weight_method", "minmax")


@pytest.mark.parametrize("command", ["quantize", "synthesize"])
def test_help_keeps_the_example_line_and_shows_only_real_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    # the docstring's example command is printed as one line, as written, not folded into prose
    assert any(line.strip().startswith(f"maskaq {command} --model vit_fmnist") for line in out.splitlines())
    assert "(default: None)" not in out and "(default: False)" not in out
    assert "(default: 4)" in out  # --wbits has a real default, and it is shown


# ----------------------------------------------------------------------------- a run on an image folder

# The tiny ViT with a 2-class head, for a folder of 2 classes.
TINY2 = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
         json.dumps(dict(img_size=28, patch_size=7, in_chans=1, num_classes=2, embed_dim=24, depth=2, num_heads=3))]
QUICK = ["--preset", "quick", "--set", "qat_epochs=1"]


def _image_folder(root, classes=("cat", "dog"), per_class=4):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (20, 20, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One finished `maskaq quantize` run on an image folder, with its ONNX and integer exports."""
    root = tmp_path_factory.mktemp("run")
    images = _image_folder(root / "imgs")
    out = root / "out"
    assert main(["quantize", *TINY2, *QUICK, "--data", str(images), "--out", str(out)]) == 0
    assert main(["export", str(out / "model"), "--format", "onnx", "--out", str(out / "model.onnx")]) == 0
    assert main(["export", str(out / "model"), "--format", "integer", "--out", str(out / "integer")]) == 0
    return out, images


def _eval_json(argv, capsys):
    capsys.readouterr()
    assert main(["eval", *argv, "--no-progress", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("how", ["folder", "run", "checkpoint_folder", "checkpoint_file"])
def test_eval_takes_the_student_quantize_wrote(run_dir, how, capsys):
    out, images = run_dir
    argv = {"folder": [str(out / "model")], "run": [str(out)],
            "checkpoint_folder": [*TINY2[:2], "--model-kwargs", TINY2[3], "--checkpoint", str(out / "model")],
            "checkpoint_file": [*TINY2[:2], "--model-kwargs", TINY2[3],
                                "--checkpoint", str(out / "model" / "model.safetensors")]}[how]
    report = _eval_json([*argv, "--data", str(images)], capsys)
    expected = json.loads((out / "report.json").read_text())["val"]["quantized"]["top1"]
    assert report["kind"] == "fake-quant W4A4" and report["images"] == 8
    assert report["top1"] == pytest.approx(expected, abs=1e-3)


def test_eval_compares_the_student_its_integer_and_onnx_exports_in_one_command(run_dir, capsys):
    out, images = run_dir
    # models before and after options, as a shell user writes them
    reports = _eval_json([str(out / "model"), "--data", str(images), str(out / "integer"), str(out / "model.onnx"),
                          "vit_tiny_patch16_224", "--model-kwargs", TINY2[3]], capsys)
    assert [r["kind"] for r in reports] == ["fake-quant W4A4", "integer W4A4", "onnx", "full precision"]
    assert all(r["images"] == 8 and 0 <= r["top1"] <= 100 for r in reports)


def test_load_quantized_and_load_integer_need_only_the_folder(run_dir):
    import maskaq

    out, _ = run_dir
    x = torch.randn(3, 1, 28, 28)
    student = maskaq.load_quantized(out / "model")
    teacher = maskaq.zoo.create("vit_tiny_patch16_224", **json.loads(TINY2[3]))
    with torch.no_grad():
        assert torch.equal(student(x), maskaq.load_quantized(out / "model", teacher)(x))
        assert maskaq.load_integer(out / "integer")(x).shape == (3, 2)


def test_saved_files_are_readable_by_others_under_the_usual_umask(run_dir, tmp_path):
    out, _ = run_dir
    old = os.umask(0o022)
    try:
        from maskaq._files import write_json
        write_json(tmp_path / "r.json", {})
        written = [tmp_path / "r.json", out / "model" / "model.safetensors", out / "report.json",
                   out / "integer" / "integer.safetensors", out / "model.onnx"]
        assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o644"}
    finally:
        os.umask(old)


def _one_error_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_an_unreadable_image_stops_the_run_before_it_starts_and_can_be_skipped(tmp_path, capsys):
    images = _image_folder(tmp_path / "imgs")
    (images / "dog" / "broken.png").write_text("not an image")
    out = tmp_path / "out"
    assert main(["quantize", *TINY2, *QUICK, "--data", str(images), "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "broken.png" in line and "--skip-bad-images" in line and not out.exists()
    assert main(["quantize", *TINY2, *QUICK, "--data", str(images), "--out", str(out), "--skip-bad-images",
                 "--method", "ptq"]) == 0
    assert "left out 1 unreadable" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["val"]["quantized"]


def test_an_output_folder_that_cannot_be_made_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["quantize", *TINY2, *QUICK, "--out", str(tmp_path / "file" / "run")]) == 2
    assert "cannot be created" in _one_error_line(capsys)
    assert main(["synthesize", *TINY2, "--preset", "quick", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in _one_error_line(capsys)


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # what a read-only folder answers (root writes anyway)
    assert main(["quantize", *TINY2, *QUICK, "--out", str(tmp_path / "run")]) == 2
    assert "cannot be written (Permission denied" in _one_error_line(capsys)


def test_more_classes_than_the_head_is_an_error_fewer_a_warning(tmp_path, capsys):
    three = _image_folder(tmp_path / "three", ("a", "b", "c"), 1)
    assert main(["quantize", *TINY2, *QUICK, "--data", str(three), "--out", str(tmp_path / "x")]) == 2
    assert "has 3 classes but the model's head has 2" in _one_error_line(capsys)
    two = _image_folder(tmp_path / "two", ("a", "b"), 1)
    assert main(["eval", "vit_tiny_patch16_224", "--img-size", "28", "--in-chans", "1", "--data", str(two),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: --data" in err and "has 2 classes but the model's head has 1000 outputs" in err


def test_a_finished_run_is_kept_unless_overwrite(run_dir, tmp_path, capsys):
    out, images = run_dir
    before = (out / "model" / "model.safetensors").read_bytes()
    assert main(["quantize", *TINY2, *QUICK, "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "holds a finished run" in line and "--overwrite" in line
    assert (out / "model" / "model.safetensors").read_bytes() == before
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(["quantize", *TINY2, *QUICK, "--method", "ptq", "--out", str(copy), "--overwrite"]) == 0
    assert json.loads((copy / "report.json").read_text())["method"] == "ptq"


def test_resume_with_no_stopped_run_says_so_and_stops(run_dir, tmp_path, capsys):
    out, _ = run_dir
    assert main(["quantize", *TINY2, *QUICK, "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "nothing to resume" in _one_error_line(capsys) and not (tmp_path / "new").exists()
    assert main(["quantize", *TINY2, *QUICK, "--out", str(out), "--resume"]) == 2
    assert "holds a finished run" in _one_error_line(capsys)


def test_an_interrupted_run_names_the_command_that_continues_it(tmp_path, capsys, monkeypatch):
    from maskaq.commands import quantize

    def interrupted(*args, checkpoint_dir, **kwargs):
        checkpoint_dir.mkdir(parents=True)
        (checkpoint_dir / "state.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "run_pipeline", interrupted)
    out = tmp_path / "out"
    argv = ["quantize", *TINY2, *QUICK, "--out", str(out), "--overwrite"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    import shlex
    assert "interrupted" in err and "maskaq " + shlex.join(argv[:-1] + ["--resume"]) in err
    assert main(argv[:-1]) == 2  # without --resume the stopped run is not started over silently
    assert "--resume` continues it" in _one_error_line(capsys)


def test_a_late_error_keeps_the_student_and_resume_finishes_the_run(tmp_path, capsys, monkeypatch):
    from maskaq.commands import quantize

    from maskaq import zoo

    images = _image_folder(tmp_path / "imgs")
    teacher = zoo.create("vit_tiny_patch16_224", **json.loads(TINY2[3]))
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")  # the same teacher in both runs
    out = tmp_path / "out"
    argv = ["quantize", *TINY2, *QUICK, "--checkpoint", str(tmp_path / "teacher.pth"), "--data", str(images),
            "--out", str(out)]
    real = quantize.evaluate_model

    def unreadable(*args, **kwargs):
        raise OSError("cannot identify image file 'imgs/dog/3.png'")

    monkeypatch.setattr(quantize, "evaluate_model", unreadable)
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "cannot identify image file" in line and "--resume` continues it" in line
    assert (out / "model" / "model.safetensors").is_file() and any((out / "checkpoint").iterdir())
    monkeypatch.setattr(quantize, "evaluate_model", real)
    assert main(argv + ["--resume"]) == 0
    assert "top1" in json.loads((out / "report.json").read_text())["val"]["quantized"]
    assert not (out / "checkpoint").exists()


# ----------------------------------------------------------------------------- one vocabulary

def _options(command):
    """Option string -> action of the options ``maskaq COMMAND --help`` shows."""
    import argparse

    from maskaq.cli import build_parser

    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {opt: action for action in sub.choices[command]._actions for opt in action.option_strings
            if action.help != argparse.SUPPRESS}


def test_every_subcommand_speaks_one_vocabulary():
    from maskaq.cli import COMMANDS
    from maskaq.commands.common import DEVICE_HELP

    options = {command: _options(command) for command in COMMANDS}
    for command, opts in options.items():
        # one name for each thing; the old spellings are hidden aliases
        assert not {"--batch-size", "--val", "--val-limit", "--student"} & set(opts), command
        if "--device" in opts:
            assert opts["--device"].default is None and opts["--device"].help == DEVICE_HELP, command
    for command in ("quantize", "synthesize", "eval", "export"):
        assert {"--model", "--checkpoint", "--model-kwargs", "--num-classes", "--img-size", "--in-chans"} \
            <= set(options[command]), command
    for command in ("quantize", "eval"):
        assert {"--data", "--limit", "--eval-batch-size", "--skip-bad-images", "--device"} <= set(options[command])
    for command in ("quantize", "synthesize", "train-teacher"):
        assert {"--out", "--overwrite", "--resume"} <= set(options[command]), command
    assert "--synth-batch-size" in options["synthesize"] and not options["export"]["--model"].required


@pytest.mark.parametrize("command, old, new, value", [
    ("quantize", "--val", "--data", "fashion-mnist"),
    ("quantize", "--val-limit", "--limit", 7),
    ("quantize", "--batch-size", "--eval-batch-size", 9),
    ("synthesize", "--batch-size", "--synth-batch-size", 3),
    ("eval", "--batch-size", "--eval-batch-size", 9),
    ("export", "--batch-size", "--onnx-batch-size", 2),
    ("export", "--student", "STUDENT", "s"),
    ("train-teacher", "--batch-size", "--train-batch-size", 16),
])
def test_old_spellings_still_work_with_a_note(command, old, new, value, capsys):
    from maskaq.cli import build_parser

    extra = {"quantize": ["--model", "m", "--out", "o"], "synthesize": ["--model", "m", "--out", "o"],
             "export": ["--out", "o"]}.get(command, [])
    args = build_parser(command).parse_args([command, *extra, old, str(value)])
    dest = {"STUDENT": "student"}.get(new, new.lstrip("-").replace("-", "_"))
    if command == "train-teacher":
        dest = "batch_size"
    assert getattr(args, dest) == value
    err = capsys.readouterr().err
    assert f"{old} is deprecated" in err and new in err


def test_bench_prints_one_table_and_no_third_party_warnings(capfd):
    assert main(["bench", "--models", "vit_tiny_patch16_224", "--impls", "fp32", "ort_int8", "--batches", "1", "2",
                 "--rounds", "1", "--iters", "1", "--threads", "1", "--omp-wait-policy", "inherit"]) == 0
    out, err = capfd.readouterr()
    assert (out + err).count("peak MB") == 1
    assert "WARNING:root:" not in err
    rows = [line for line in out.splitlines() if line.startswith("vit_tiny_patch16_224")]
    from packaging.version import Version
    import onnxruntime

    if Version(onnxruntime.__version__) >= Version("1.24"):
        assert len(rows) == 4
    else:  # no ConvInteger on int8 weights: the ort_int8 rows are skipped with the reason
        assert len(rows) == 2 and "onnxruntime >= 1.24" in out + err


# ----------------------------------------------------------------------------- finished work kept everywhere

def _fmnist_root(root, train=32, test=16):
    """Fashion-MNIST idx files of a few random images, so that train-teacher runs in a second."""
    g = torch.Generator().manual_seed(0)
    root.mkdir(parents=True)
    for stem, n in (("train", train), ("t10k", test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8).numpy()
        labels = (torch.arange(n) % 10).to(torch.uint8).numpy()
        size = n.to_bytes(4, "big")
        (root / f"{stem}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + size + (28).to_bytes(4, "big") * 2
                                                         + images.tobytes())
        (root / f"{stem}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + size + labels.tobytes())
    return root


def _teacher_argv(tmp_path, *extra):
    root = tmp_path / "fmnist"
    if not root.exists():
        _fmnist_root(root)
    return ["train-teacher", "--root", str(root), "--embed-dim", "24", "--depth", "1", "--num-heads", "3",
            "--patch-size", "7", "--train-batch-size", "16", "--threads", "1", "--no-progress",
            "--time-budget-min", "0", *extra]


def test_train_teacher_keeps_a_finished_run_and_its_export_unless_overwrite(tmp_path, capsys):
    run, zoo_dir = str(tmp_path / "run"), str(tmp_path / "zoo")
    first = _teacher_argv(tmp_path, "--epochs", "1", "--out", run, "--export", zoo_dir)
    assert main(first) == 0
    weights = (tmp_path / "zoo" / "vit_fmnist.safetensors").read_bytes()
    capsys.readouterr()
    assert main(_teacher_argv(tmp_path, "--epochs", "1", "--out", run)) == 2
    line = _one_error_line(capsys)
    assert "holds a finished run" in line and "--overwrite" in line and "--resume" in line
    assert main(_teacher_argv(tmp_path, "--epochs", "1", "--out", str(tmp_path / "other"), "--export", zoo_dir)) == 2
    line = _one_error_line(capsys)
    assert "vit_fmnist.safetensors exists" in line and "--overwrite" in line and not (tmp_path / "other").exists()
    assert (tmp_path / "zoo" / "vit_fmnist.safetensors").read_bytes() == weights
    # a next stage continues the finished run; the export it replaces still needs --overwrite
    more = _teacher_argv(tmp_path, "--epochs", "2", "--out", run, "--export", zoo_dir, "--resume")
    assert main(more) == 2
    assert "vit_fmnist.safetensors exists" in _one_error_line(capsys)
    assert main(more + ["--overwrite"]) == 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2]
    assert json.loads((tmp_path / "zoo" / "vit_fmnist.json").read_text())["training"]["epochs"] == 2
    assert main(first + ["--overwrite"]) == 0  # starts over
    assert [e["epoch"] for e in json.loads((tmp_path / "run" / "log.json").read_text())["epochs"]] == [1]


def test_train_teacher_resume_with_nothing_to_resume_stops_with_one_line(tmp_path, capsys):
    assert main(_teacher_argv(tmp_path, "--out", str(tmp_path / "new"), "--resume")) == 2
    line = _one_error_line(capsys)
    assert "nothing to resume" in line and "checkpoint.pth is missing" in line and not (tmp_path / "new").exists()


def test_an_interrupted_train_teacher_names_the_command_that_continues_it(tmp_path, capsys, monkeypatch):
    import shlex

    from maskaq.commands import train_teacher

    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "vit_fmnist.json").write_text("{}")  # an earlier export, which --overwrite replaces
    argv = _teacher_argv(tmp_path, "--epochs", "3", "--out", str(tmp_path / "run"), "--export",
                         str(tmp_path / "zoo"), "--overwrite")
    real, calls = train_teacher.test_accuracy, []

    def second_epoch_interrupted(*args, **kwargs):  # epoch 1 is checkpointed, epoch 2 is not
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_teacher, "test_accuracy", second_epoch_interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err
    continues = "maskaq " + shlex.join(argv + ["--resume"])  # --overwrite kept: the export is not written yet
    assert "interrupted" in err and "checkpoint.pth" in err and f"`{continues}` continues it" in err
    monkeypatch.setattr(train_teacher, "test_accuracy", real)
    assert main([a for a in argv if a != "--overwrite"]) == 2  # not started over silently
    assert "holds a stopped run" in _one_error_line(capsys)
    assert main(shlex.split(continues)[1:]) == 0
    assert [e["epoch"] for e in json.loads((tmp_path / "run" / "log.json").read_text())["epochs"]] == [1, 2, 3]
    assert json.loads((tmp_path / "zoo" / "vit_fmnist.json").read_text())["training"]["epochs"] == 3


def test_demo_keeps_an_earlier_demo_unless_overwrite(tmp_path, capsys, monkeypatch):
    import shlex

    from maskaq import zoo

    earlier = tmp_path / "d"
    earlier.mkdir()
    (earlier / "demo.json").write_text("{}")
    assert main(["demo", "--preset", "quick", "--limit", "8", "--out", str(earlier)]) == 2
    line = _one_error_line(capsys)
    assert "holds an earlier demo" in line and "--overwrite" in line
    assert (earlier / "demo.json").read_text() == "{}"
    monkeypatch.chdir(tmp_path)  # the default --out is ./maskaq-demo
    (tmp_path / "maskaq-demo").mkdir()
    (tmp_path / "maskaq-demo" / "demo.json").write_text("{}")
    assert main(["demo", "--preset", "quick", "--limit", "8"]) == 2
    assert "maskaq-demo holds an earlier demo" in _one_error_line(capsys)
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "refused unless --overwrite" in " ".join(capsys.readouterr().out.split())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "load", interrupted)  # --overwrite gets past the check; a stop says what reruns it
    argv = ["demo", "--preset", "quick", "--limit", "8", "--overwrite"]
    assert main(argv) == 130
    assert f"interrupted; `maskaq {shlex.join(argv)}` runs it again" in capsys.readouterr().err


def test_eval_json_keeps_an_existing_file_unless_overwrite(tmp_path, capsys):
    result = tmp_path / "r.json"
    result.write_text("earlier")
    argv = ["eval", *TINY, "--limit", "8", "--no-progress", "--json", str(result)]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith("maskaq eval: error: --json") and "exists" in line and "--overwrite" in line
    assert result.read_text() == "earlier"
    assert main(argv + ["--overwrite"]) == 0
    assert json.loads(result.read_text())["images"] == 8


@pytest.mark.parametrize("flag, name", [("--json", "b.json"), ("--plot", "b.png")])
def test_bench_keeps_its_existing_files_unless_overwrite(flag, name, tmp_path, capsys):
    (tmp_path / name).write_text("earlier")
    assert main(["bench", "--quick", flag, str(tmp_path / name)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"maskaq bench: error: {flag}") and "exists" in line and "--overwrite" in line
    assert (tmp_path / name).read_text() == "earlier"


def test_an_interrupted_bench_names_its_partial_results_and_the_command_that_reruns_it(tmp_path, capsys,
                                                                                     monkeypatch):
    import shlex

    from maskaq.commands import bench

    def interrupted(args, *rest, **kwargs):
        bench.write_json([{"model": "m"}], args.json)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_benchmark", interrupted)
    argv = ["bench", "--quick", "--omp-wait-policy", "inherit", "--json", str(tmp_path / "b.json")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    rerun = "maskaq " + shlex.join(argv + ["--overwrite"])  # the partial file would be refused otherwise
    assert f"the results so far are in {tmp_path / 'b.json'}; `{rerun}` runs it again" in err


def test_an_interrupted_synthesize_names_the_command_that_starts_it_again(tmp_path, capsys, monkeypatch):
    import shlex

    from maskaq.commands import synthesize

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthesize, "_make_images", interrupted)
    argv = ["synthesize", *TINY, "--preset", "quick", "--out", str(tmp_path / "imgs")]
    assert main(argv) == 130
    assert f"nothing was saved yet; `maskaq {shlex.join(argv)}` starts the run again" in capsys.readouterr().err
