"""`maskaq quantize`, `maskaq synthesize` and `maskaq demo` end to end, and bad input -> exit 2."""
import json
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
               "--val", "fashion-mnist", "--val-limit", "32", "--out", str(out), "--set", "qat_epochs=1"])
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
               "--batch-size", "3", "--iters", "2", "--out", str(out)])
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
