"""What maskaq saves from Python: a student and its integer export load from their folders alone,
and every file is written with the process umask like any other tool's."""
import os

import pytest
import torch

from maskaq import zoo


@pytest.fixture(scope="module")
def student():
    from maskaq.quant import calibrate, quantize_model

    if "vit_fmnist" not in zoo.available():
        pytest.skip("the bundled teacher maskaq/zoo/vit_fmnist.safetensors is not there")
    torch.manual_seed(0)
    qmodel = quantize_model(zoo.load("vit_fmnist"), 4, 8)
    calibrate(qmodel, torch.randn(4, 1, 28, 28))
    return qmodel.eval()


def test_a_student_and_its_integer_export_load_from_their_folders_alone(student, tmp_path):
    from maskaq.integer import export_integer, load_integer, save_integer
    from maskaq.quant import load_quantized, save_quantized

    save_quantized(student, tmp_path / "run" / "model")
    imodel = export_integer(student)
    save_integer(imodel, tmp_path / "integer")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = student(x)
        # the folder, its weights file, or the `maskaq quantize --out` folder holding it
        for where in (tmp_path / "run" / "model", tmp_path / "run" / "model" / "model.safetensors", tmp_path / "run"):
            assert torch.equal(load_quantized(where)(x), expected), where
        assert torch.equal(load_integer(tmp_path / "integer")(x), imodel(x))


def test_a_folder_without_its_model_record_asks_for_the_model(student, tmp_path):
    import json

    from maskaq.quant import load_quantized, save_quantized

    save_quantized(student, tmp_path / "s")
    config = json.loads((tmp_path / "s" / "quant_config.json").read_text())
    del config["model"]  # as an older maskaq wrote it
    (tmp_path / "s" / "quant_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not record which model"):
        load_quantized(tmp_path / "s")
    assert load_quantized(tmp_path / "s", zoo.load("vit_fmnist")) is not None


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_saved_files_follow_the_process_umask(student, tmp_path, umask, mode):
    from maskaq._files import write_json
    from maskaq.integer import export_integer, save_integer
    from maskaq.quant import save_quantized

    old = os.umask(umask)
    try:
        save_quantized(student, tmp_path / "model")
        save_integer(export_integer(student), tmp_path / "integer")
        write_json(tmp_path / "report.json", {"top1": 1.0})
    finally:
        os.umask(old)
    written = [tmp_path / "model" / "model.safetensors", tmp_path / "model" / "quant_config.json",
               tmp_path / "integer" / "integer.safetensors", tmp_path / "report.json"]
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(mode)}
