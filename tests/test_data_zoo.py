"""Fashion-MNIST / ImageFolder data, the model zoo, evaluate() and the `maskaq eval` /
`maskaq train-teacher` commands."""
import json

import numpy as np
import pytest
import torch

from maskaq import data, zoo
from maskaq.evaluation import evaluate

HAVE_DEBIAN_FMNIST = (data.DEBIAN_FMNIST_ROOT / "train-images-idx3-ubyte.gz").is_file()
HAVE_TEACHER = "vit_fmnist" in zoo.available()
needs_debian = pytest.mark.skipif(not HAVE_DEBIAN_FMNIST, reason="apt-get install dataset-fashion-mnist")
needs_teacher = pytest.mark.skipif(not HAVE_TEACHER, reason="bundled teacher not exported yet")


@pytest.fixture(scope="module")
def test_split():
    return data.fashion_mnist("test")


# ----------------------------------------------------------------------------- data

def test_bundled_test_split_shapes_labels_and_normalization(test_split):
    assert len(test_split) == 10000
    x, y = test_split[123]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y < 10
    assert torch.bincount(test_split.labels, minlength=10).tolist() == [1000] * 10
    raw = test_split.images_uint8.float() / 255
    expected = (raw - data.FMNIST_MEAN[0]) / data.FMNIST_STD[0]
    torch.testing.assert_close(test_split.images[:, 0], expected)
    # Statistics are the training set's, so the test images come out close to zero mean, unit std.
    assert abs(test_split.images.mean().item()) < 0.05
    assert abs(test_split.images.std().item() - 1) < 0.05


@needs_debian
def test_bundled_test_split_equals_the_idx_files(test_split):
    root = data.DEBIAN_FMNIST_ROOT
    assert np.array_equal(data.read_idx(root / "t10k-images-idx3-ubyte.gz"), test_split.images_uint8.numpy())
    assert np.array_equal(data.read_idx(root / "t10k-labels-idx1-ubyte.gz"), test_split.labels.numpy())
    from_root = data.fashion_mnist("test", root=root)
    assert torch.equal(from_root.images, test_split.images)


@needs_debian
def test_train_split_from_debian_path():
    train = data.fashion_mnist("train")
    assert len(train) == 60000 and train.images.shape == (60000, 1, 28, 28)
    assert int(train.labels.min()) == 0 and int(train.labels.max()) == 9
    # FMNIST_MEAN/STD are the train statistics.
    assert abs(train.images.mean().item()) < 1e-3 and abs(train.images.std().item() - 1) < 1e-3


def test_missing_dataset_path_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("train", root=tmp_path)  # exists but holds no idx files
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("test", root=tmp_path / "nope")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.fashion_mnist("val")


def test_read_idx_rejects_non_idx_files(tmp_path):
    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(bad)
    truncated = tmp_path / "short-idx1-ubyte"
    truncated.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(3))
    with pytest.raises(ValueError, match="header says"):
        data.read_idx(truncated)


def _png_folder(root):
    """Two classes of PNGs: several sizes, odd aspect ratios, RGB, grayscale and palette images."""
    from PIL import Image
    rng = np.random.default_rng(0)
    shapes = {"cat": [(37, 53), (301, 97)], "dog": [(64, 64), (90, 251), (15, 23)]}
    for name, sizes in shapes.items():
        (root / name).mkdir()
        for i, (h, w) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            image = image.convert("L") if i == 1 else image.convert("P") if i == 2 else image
            image.save(root / name / f"{i}.png")
    return root


# timm cfgs with different crop_pct, interpolation and normalization
_TIMM_CFGS = {
    "vit_tiny_patch16_224": dict(img_size=64),
    "deit_tiny_patch16_224": dict(img_size=48),
    "swin_tiny_patch4_window7_224": dict(img_size=56, window_size=7),
}


@pytest.mark.parametrize("name", sorted(_TIMM_CFGS))
def test_image_folder_equals_timm_eval_transform(tmp_path, name):
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    root = _png_folder(tmp_path)
    model = timm.create_model(name, pretrained=False, num_classes=2, depth=1 if "swin" not in name else None,
                              **_TIMM_CFGS[name]) if "swin" not in name else \
        timm.create_model(name, pretrained=False, num_classes=2, depths=(1, 1, 1, 1), **_TIMM_CFGS[name])
    ds = data.image_folder(root, model)
    assert ds.classes == ["cat", "dog"] and len(ds) == 5
    config = resolve_data_config(model=model)
    transform = create_transform(**config)
    for i, (path, label) in enumerate(ds.samples):
        x, y = ds[i]
        with Image.open(path) as im:
            expected = transform(im.convert("RGB"))
        assert y == label and x.shape == tuple(config["input_size"])
        assert torch.equal(x, expected), path
    # overrides win over the pretrained_cfg
    small = data.image_folder(root, model, input_size=(3, 20, 30), crop_pct=1.0, interpolation="bilinear")
    assert small[0][0].shape == (3, 20, 30)


def test_image_folder_grayscale_model_and_errors(tmp_path):
    from PIL import Image
    root = _png_folder(tmp_path)
    gray = data.image_folder(root, None, input_size=(1, 8, 8), mean=(0.5,), std=(0.5,))
    x, _ = gray[0]
    assert x.shape == (1, 8, 8)
    with Image.open(gray.samples[0][0]) as im:
        assert im.mode == "RGB" and gray.loader(gray.samples[0][0]).mode == "L"  # read as the model takes it
    with pytest.raises(FileNotFoundError, match="sub-directory"):
        data.image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="mean/std need 3 values"):
        data.image_folder(root, None, input_size=(3, 8, 8), mean=(0.5, 0.5), std=(0.5, 0.5))
    with pytest.raises(TypeError, match="unknown data config"):
        data.image_folder(root, None, crop=0.9)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="sub-directory"):
        data.image_folder(empty)


# ----------------------------------------------------------------------------- zoo

@needs_teacher
@pytest.mark.parametrize("name, patches, prefix, heads", [("vit_fmnist", 49, 1, 3), ("vit_fmnist_reg", 16, 2, 4)])
def test_bundled_teacher_loads_with_pretrained_cfg_and_is_accurate(test_split, name, patches, prefix, heads):
    model = zoo.load(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (1, 28, 28) and cfg["num_classes"] == 10
    assert tuple(cfg["mean"]) == data.FMNIST_MEAN and tuple(cfg["std"]) == data.FMNIST_STD
    assert model.patch_embed.num_patches == patches and model.num_prefix_tokens == prefix
    assert len(model.blocks) == 6 and model.blocks[0].attn.num_heads == heads
    subset = torch.utils.data.Subset(test_split, range(1000))
    result = evaluate(model, torch.utils.data.DataLoader(subset, batch_size=250), progress=False)
    assert result["top1"] >= 85.0, result
    assert result["top5"] >= result["top1"]


def _tiny_vit(**kwargs):
    options = dict(img_size=32, patch_size=16, depth=1, num_classes=7)
    options.update(kwargs)
    torch.manual_seed(0)
    return zoo.create("vit_tiny_patch16_224", **options)


@pytest.mark.parametrize("fmt", ["pth_wrapped", "pth_ddp", "safetensors"])
def test_create_round_trips_a_local_checkpoint(tmp_path, fmt):
    source = _tiny_vit()
    state = source.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "pth_wrapped":
        path = tmp_path / "w.pth"
        torch.save({"model": state, "epoch": 3}, path)
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    torch.manual_seed(1)  # a different random init, so only the checkpoint can make them agree
    loaded = zoo.create("vit_tiny_patch16_224", checkpoint=str(path), img_size=32, patch_size=16, depth=1,
                        num_classes=7)
    assert not loaded.training
    assert loaded.pretrained_cfg["num_classes"] == 7 and tuple(loaded.pretrained_cfg["input_size"]) == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


def test_create_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'not_a_model'"):
        zoo.create("not_a_model")
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.load("not_in_zoo")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zoo.create("vit_tiny_patch16_224", checkpoint=str(tmp_path / "absent.pth"), img_size=32, depth=1)
    path = tmp_path / "seven.pth"
    torch.save(_tiny_vit().state_dict(), path)
    with pytest.raises(ValueError, match=r"shape mismatches: head.bias: checkpoint \(7,\) vs model \(5,\), head.weight"):
        zoo.create("vit_tiny_patch16_224", checkpoint=str(path), img_size=32, patch_size=16, depth=1, num_classes=5)
    with pytest.raises(ValueError, match="unexpected keys: blocks.1"):
        torch.save(_tiny_vit(depth=2).state_dict(), path)
        zoo.create("vit_tiny_patch16_224", checkpoint=str(path), img_size=32, patch_size=16, depth=1, num_classes=7)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        zoo.create("vit_tiny_patch16_224", checkpoint=str(tmp_path / "junk.pth"), img_size=32, depth=1)


# ----------------------------------------------------------------------------- evaluate

class _RankOracle(torch.nn.Module):
    """Returns its input as logits and records the mode it was called in."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return x + self.dummy


def _logits_with_label_at_rank(labels, ranks, num_classes, generator):
    """Random logits where the true label is the ranks[i]-th largest (0 = top-1)."""
    logits = torch.empty(len(labels), num_classes)
    for i, (label, rank) in enumerate(zip(labels.tolist(), ranks)):
        values = torch.sort(torch.rand(num_classes, generator=generator), descending=True).values
        others = [c for c in torch.randperm(num_classes, generator=generator).tolist() if c != label]
        order = others[:rank] + [label] + others[rank:]
        logits[i, order] = values
    return logits


def test_evaluate_top1_top5_match_construction_and_restore_mode():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (40,), generator=g)
    ranks = [0] * 13 + [3] * 9 + [4] * 6 + [5] * 7 + [9] * 5  # top-1: 13, top-5: 28 of 40
    logits = _logits_with_label_at_rank(labels, ranks, 10, g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(logits, labels), batch_size=16)
    model = _RankOracle().train()
    result = evaluate(model, loader, device="cpu", progress=False)
    assert result == {"top1": pytest.approx(100 * 13 / 40), "top5": pytest.approx(100 * 28 / 40)}
    assert model.modes == [False] * 3 and model.training  # ran in eval mode, training mode restored
    model.eval()
    evaluate(model, loader, progress=False)
    assert not model.training


def test_evaluate_fewer_than_five_classes_and_plain_dataset():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (12,), generator=g)
    logits = _logits_with_label_at_rank(labels, [0] * 7 + [1] * 3 + [2] * 2, 3, g)
    result = evaluate(_RankOracle(), torch.utils.data.TensorDataset(logits, labels), progress=False)
    assert result["top1"] == pytest.approx(100 * 7 / 12) and result["top5"] == pytest.approx(100.0)


def test_evaluate_rejects_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        evaluate(lambda x: x, [], progress=False)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(_RankOracle(), [], progress=False)


# ----------------------------------------------------------------------------- CLI

def test_cli_eval_help(capsys):
    from maskaq.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "--limit" in out and "--data" in out


def test_cli_eval_timm_model_with_checkpoint_on_a_subset(tmp_path, capsys):
    from maskaq.cli import main
    torch.manual_seed(0)
    model = zoo.create("vit_tiny_patch16_224", img_size=28, in_chans=1, num_classes=10)
    torch.save({"model": model.state_dict()}, tmp_path / "m.pth")
    out_json = tmp_path / "r" / "result.json"
    rc = main(["eval", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "m.pth"), "--img-size", "28",
               "--in-chans", "1", "--num-classes", "10", "--limit", "48", "--batch-size", "32",
               "--no-progress", "--json", str(out_json)])
    assert rc == 0
    # The CLI rebuilds the architecture from its options and the checkpoint: compare with the original.
    report = json.loads(out_json.read_text())
    subset = torch.utils.data.Subset(data.fashion_mnist("test"), range(48))
    expected = evaluate(model, subset, progress=False)
    assert report["images"] == 48
    assert report["top1"] == pytest.approx(expected["top1"], abs=1e-3)
    assert report["top5"] == pytest.approx(expected["top5"], abs=1e-3)
    assert "top-1" in capsys.readouterr().out


def test_cli_eval_errors_are_one_line(tmp_path, capsys):
    from maskaq.cli import main
    assert main(["eval", "not_a_model", "--no-progress"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["eval", "vit_tiny_patch16_224", "--img-size", "32", "--no-progress"]) == 2
    assert "pass --data" in capsys.readouterr().err
    assert main(["eval", "vit_tiny_patch16_224", "--data", str(tmp_path / "none"), "--no-progress"]) == 2
    assert "is not a directory" in capsys.readouterr().err


@needs_teacher
def test_cli_eval_bundled_teacher_json_stdout(capsys):
    from maskaq.cli import main
    assert main(["eval", "vit_fmnist", "--limit", "200", "--seed", "0", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["images"] == 200 and report["top1"] >= 80.0


# ----------------------------------------------------------------------------- train-teacher

def test_train_augment_crops_and_flips_are_windows_of_the_padded_image():
    from maskaq.commands.train_teacher import augment
    x = torch.randn(6, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    out = augment(x, 2, True, g, fill=-7.0)
    padded = torch.nn.functional.pad(x, (2,) * 4, value=-7.0)
    for b in range(6):
        windows = [padded[b, :, i:i + 28, j:j + 28] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) or torch.equal(out[b], w.flip(-1)) for w in windows)


def test_train_lr_schedule_warms_up_then_anneals():
    import argparse
    from maskaq.commands.train_teacher import lr_at
    args = argparse.Namespace(lr=1e-3, min_lr=1e-5, warmup=0.1)
    assert lr_at(0.0, args) < 1e-5
    assert lr_at(0.05, args) == pytest.approx(5e-4)
    assert lr_at(0.1, args) == pytest.approx(1e-3)
    assert lr_at(0.55, args) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(1.0, args) == pytest.approx(1e-5)


@needs_debian
def test_cli_train_teacher_tiny_run_checkpoint_resume_and_export(tmp_path, capsys):
    from maskaq.cli import main
    from timm.models.vision_transformer import VisionTransformer
    common = ["train-teacher", "--out", str(tmp_path / "run"), "--embed-dim", "24", "--depth", "1",
              "--num-heads", "3", "--patch-size", "7", "--batch-size", "512", "--threads", "1", "--no-progress"]
    assert main(common + ["--epochs", "1", "--time-budget-min", "0.03"]) == 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert len(log["epochs"]) == 1 and (tmp_path / "run" / "checkpoint.pth").is_file()
    assert main(common + ["--epochs", "2", "--time-budget-min", "0.06", "--resume",
                          "--export", str(tmp_path / "zoo")]) == 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2] and log["epochs"][1]["steps"] > log["epochs"][0]["steps"]
    config = json.loads((tmp_path / "zoo" / "vit_fmnist.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28] and config["training"]["epochs"] == 2
    model = VisionTransformer(**config["model_args"])
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(tmp_path / "zoo" / "vit_fmnist.safetensors")))
    # A second stage: same weights, a fresh warmup + cosine (the first step's lr is the warmup's).
    assert main(common + ["--epochs", "3", "--time-budget-min", "0.03", "--resume", "--restart-schedule"]) == 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2, 3]
    assert [s["restart_schedule"] for s in log["summary"]["stages"]] == [False, False, True]
    assert log["summary"]["stages"][1]["from_epoch"] == 1 and log["summary"]["stages"][2]["from_epoch"] == 2
    capsys.readouterr()
    assert main(common + ["--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
    assert main(common + ["--restart-schedule"]) == 2
    assert "only makes sense with --resume" in capsys.readouterr().err


@needs_debian
def test_cli_train_teacher_with_register_tokens_exports_a_model_zoo_load_reads(tmp_path, capsys):
    from maskaq.cli import main
    from maskaq.spec import describe_model
    args = ["train-teacher", "--out", str(tmp_path / "run"), "--embed-dim", "24", "--depth", "1", "--num-heads", "4",
            "--patch-size", "7", "--reg-tokens", "2", "--batch-size", "512", "--threads", "1", "--no-progress",
            "--epochs", "1", "--time-budget-min", "0.02", "--export", str(tmp_path / "zoo"), "--export-name", "reg"]
    assert main(args) == 0
    model = zoo.load("reg", directory=tmp_path / "zoo")
    spec = describe_model(model)
    assert spec.num_prefix_tokens == 3 and spec.patch_size == (7, 7)  # CLS + 2 registers before 4x4 patches
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="needs other.json and other.safetensors"):
        zoo.load("other", directory=tmp_path / "zoo")
    capsys.readouterr()
    assert main(args[:-6] + ["--reg-tokens", "-1"]) == 2
    assert "--reg-tokens must be >= 0" in capsys.readouterr().err


# --------------------------------------------------------------------- pretrained weights
_TINY_TIMM = dict(img_size=32, depth=2)


def test_pretrained_loads_through_timm_from_a_local_file(tmp_path):
    """--pretrained-file is timm's pretrained_cfg_overlay=dict(file=...): timm's own loader reads it."""
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **_TINY_TIMM)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    model = zoo.create("vit_tiny_patch16_224", pretrained_file=str(path), **_TINY_TIMM)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    with pytest.raises(ValueError, match="not both"):
        zoo.create("vit_tiny_patch16_224", pretrained=True, checkpoint=str(path), **_TINY_TIMM)
    with pytest.raises(FileNotFoundError, match="pretrained file"):
        zoo.create("vit_tiny_patch16_224", pretrained_file=str(tmp_path / "missing.pth"), **_TINY_TIMM)


def test_pretrained_without_network_or_cache_is_one_line_exit_2(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "maskaq", "eval", "vit_tiny_patch16_224",
                           "--pretrained", "--limit", "4"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pretrained weights" in lines[0] and "--pretrained-file" in lines[0], lines
