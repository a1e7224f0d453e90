"""Resumable runs: per-batch synthesis checkpoints (maskaq.synthesis.io.BatchStore) and the QAT
state (maskaq.checkpoint.RunCheckpoint). A `maskaq synthesize` or `maskaq quantize` killed with
SIGKILL (mid-synthesis, mid-QAT) and resumed ends with the images / the student of an
uninterrupted run, bit for bit (CPU, one thread); damaged or foreign checkpoints are named in a
one-line error."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maskaq._files import CheckpointMismatchError, CorruptCheckpointError
from maskaq.synthesis.io import BatchStore, load_synthetic_set

REPO = Path(__file__).resolve().parents[1]


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 1, 8, 8, generator=g), torch.randint(0, 10, (3,), generator=g)


def test_batch_store_round_trip_and_failed_batches(tmp_path):
    store = BatchStore(tmp_path / "b", {"seed": 0, "lr": 0.1})
    assert store.load(0) is None and store.finished() == []
    x, y = _batch(0)
    store.save(0, x, y, {"batch_index": 0, "loss_history": [1.0, 0.5]})
    store.save(3, None, None, {"batch_index": 3, "failed": True})
    assert store.finished() == [0, 3]
    x2, y2, info = store.load(0)
    assert torch.equal(x2, x) and torch.equal(y2, y) and info["loss_history"] == [1.0, 0.5]
    assert store.load(3) == (None, None, {"batch_index": 3, "failed": True})
    assert not list((tmp_path / "b").glob(".*tmp"))  # no temporary file left behind
    store.remove()
    assert not (tmp_path / "b").exists()


def test_batch_store_detects_damage_and_other_runs(tmp_path):
    store = BatchStore(tmp_path, {"seed": 0, "synthesis": {"lr": 0.1, "iters": 5}})
    path = store.save(0, *_batch(0), {})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the images
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="batch_00000.safetensors.*checksum"):
        store.load(0)
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(CorruptCheckpointError, match="batch_00000.safetensors.*damaged"):
        store.load(0)
    store.save(1, *_batch(1), {})
    other = BatchStore(tmp_path, {"seed": 0, "synthesis": {"lr": 0.2, "iters": 5}})
    with pytest.raises(CheckpointMismatchError, match=r"synthesis\.lr: 0\.1 there, 0\.2 now"):
        other.load(1)


def test_synthesizer_reads_finished_batches_instead_of_redoing_them(tmp_path, monkeypatch):
    from test_synthesis import tiny_vit

    from maskaq.synthesis.synthesizer import SynthesisConfig, Synthesizer
    synth = Synthesizer(tiny_vit(), SynthesisConfig(num_images=6, synth_batch_size=2, synth_iters=2), progress=False)
    store = BatchStore(tmp_path, {"run": 1})
    first = synth.synthesize(seed=5, store=store)
    assert store.finished() == [0, 1, 2]

    def no_more_work(*args, **kwargs):
        raise AssertionError("a finished batch was synthesized again")

    monkeypatch.setattr(Synthesizer, "synthesize_batch", no_more_work)
    again = synth.synthesize(seed=5, store=store)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)


class _Killed(Exception):
    """Stands in for a kill in the middle of a batch."""


def _synthesizer(kind, student_in_loop=False):
    from test_synthesis import tiny_vit

    from maskaq.synthesis.baselines import PsaqConfig, PsaqSynthesizer
    from maskaq.synthesis.synthesizer import SynthesisConfig, Synthesizer
    cfg = SynthesisConfig(num_images=6, synth_batch_size=2, synth_iters=12)
    if kind == "psaq":  # 2 rounds of 6 steps: the kill lands in the second round
        return PsaqSynthesizer(tiny_vit(), cfg, PsaqConfig(psaq_rounds=2, psaq_iters=6), progress=False)
    return Synthesizer(tiny_vit(), cfg, progress=False)


@pytest.mark.parametrize("kind", ["maskaq", "psaq"])
def test_batch_stopped_mid_way_resumes_from_its_saved_step_to_the_same_images(tmp_path, kind):
    from maskaq.quant import calibrate, quantize_model
    from test_synthesis import tiny_vit
    student = None
    if kind == "maskaq":  # Q in the loop: the alignment's random mask draws are part of the state
        student = quantize_model(tiny_vit(), 4, 4).eval()
        calibrate(student, torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    whole = _synthesizer(kind).synthesize(seed=5, student=student)

    synth = _synthesizer(kind)
    store = BatchStore(tmp_path, {"run": 1}, every_steps=4, every_seconds=1e9)
    calls = []

    def kill_in_batch_1_at_step_10(attempt, step, x):
        calls.append(step)
        if len(calls) == 12 + 11:  # batch 0's 12 steps, then batch 1's steps 0..10
            raise _Killed

    synth.on_step = kill_in_batch_1_at_step_10
    with pytest.raises(_Killed):
        synth.synthesize(seed=5, student=student, store=store)
    assert store.finished() == [0] and store.in_progress() == [1]
    assert store.progress(1).saved["step"] == 8  # saved before steps 4 and 8; step 10 was lost

    steps_run = []
    synth.on_step = lambda attempt, step, x: steps_run.append(step)
    resumed = synth.synthesize(seed=5, student=student, store=store)
    assert steps_run == list(range(8, 12)) + list(range(12))  # batch 1 from step 8, then batch 2
    assert torch.equal(resumed.images, whole.images) and torch.equal(resumed.labels, whole.labels)
    assert store.in_progress() == []  # a finished batch drops its state in progress


def test_batch_in_progress_damaged_or_of_another_run_is_refused(tmp_path):
    synth = _synthesizer("maskaq")
    store = BatchStore(tmp_path, {"run": 1}, every_steps=4, every_seconds=1e9)

    def kill(attempt, step, x):
        if step == 5:
            raise _Killed

    synth.on_step = kill
    with pytest.raises(_Killed):
        synth.synthesize(seed=5, store=store)
    path = store.progress_path(0)
    with pytest.raises(CheckpointMismatchError, match="run: 1 there, 2 now"):
        BatchStore(tmp_path, {"run": 2}).progress(0)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError, match="batch_00000.partial.pt.*checksum"):
        store.progress(0)


def _synthesize_cmd(out, *extra):
    # the bundled teacher: a model with the same weights in every process (a timm name with random
    # init would differ, and its checkpoints would rightly be refused as another model's)
    return [sys.executable, "-m", "maskaq", "synthesize", "--model", "vit_fmnist", "--method", "maskaq",
            "--preset", "quick", "--num-images", "8", "--batch-size", "2", "--iters", "25", "--seed", "3",
            "--out", str(out), *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def test_killed_synthesis_resumes_to_the_uninterrupted_images(tmp_path):
    from maskaq import zoo
    if "vit_fmnist" not in zoo.available():
        pytest.skip("the bundled teacher maskaq/zoo/vit_fmnist.safetensors is not there")
    whole = tmp_path / "whole"
    subprocess.run(_synthesize_cmd(whole), env=_env(), check=True, capture_output=True, timeout=600)
    assert not (whole / "batches").exists()  # a finished run leaves its results, not its checkpoints

    out = tmp_path / "killed"
    every_5 = ("--set", "checkpoint_every_steps=5")  # the batch in progress every 5 of its 25 steps
    proc = subprocess.Popen(_synthesize_cmd(out, *every_5), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not [p for p in (out / "batches").glob("batch_*.partial.pt") if p.name != "batch_00000.partial.pt"]:
        assert proc.poll() is None, "the run ended before a later batch saved its progress"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((out / "batches").glob("batch_*.safetensors"))
    assert 1 <= len(done) < 4 and not (out / "images.safetensors").exists()
    assert list((out / "batches").glob("batch_*.partial.pt"))  # killed mid-batch

    refused = subprocess.run(_synthesize_cmd(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    other = subprocess.run(_synthesize_cmd(out, "--resume", "--set", "tv_weight=0.001"), env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "other settings" in other.stderr and "tv_weight" in other.stderr

    subprocess.run(_synthesize_cmd(out, "--resume", *every_5), env=_env(), check=True, capture_output=True,
                   timeout=600)
    resumed, uninterrupted = (load_synthetic_set(d / "images.safetensors") for d in (out, whole))
    assert torch.equal(resumed.images, uninterrupted.images)
    assert torch.equal(resumed.labels, uninterrupted.labels)


# ---------------------------------------------------------------------------------------------
# maskaq quantize / maskaq.pipeline: the QAT state too


def _tiny_run(checkpoint_dir=None, resume=False, **overrides):
    from test_synthesis import tiny_vit

    from maskaq.pipeline import run_pipeline
    torch.manual_seed(0)
    teacher = tiny_vit()
    settings = dict(qat_epochs=4, refresh_every=2, qat_warmup_epochs=1, checkpoint_every_steps=3, progress=False)
    settings.update(overrides)
    return run_pipeline(teacher, 4, 4, method="maskaq", preset="quick", checkpoint_dir=checkpoint_dir,
                        resume=resume, **settings)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_after_steps", [1, 5])  # in round 0, in round 1
def test_pipeline_stopped_mid_qat_resumes_to_the_uninterrupted_student(tmp_path, monkeypatch, stop_after_steps):
    from maskaq.checkpoint import CheckpointSaver
    whole = _tiny_run(tmp_path / "whole").model.state_dict()
    original = CheckpointSaver.maybe_save
    calls = []

    def stop(self):
        original(self)
        calls.append(1)
        if len(calls) == stop_after_steps:
            self.save(self.round_index)  # what the last periodic save held, then the crash
            raise _Stop

    monkeypatch.setattr(CheckpointSaver, "maybe_save", stop)
    with pytest.raises(_Stop):
        _tiny_run(tmp_path / "cut")
    monkeypatch.setattr(CheckpointSaver, "maybe_save", original)
    with pytest.raises(FileExistsError, match="earlier run"):
        _tiny_run(tmp_path / "cut")
    with pytest.raises(CheckpointMismatchError, match="qat_lr"):
        _tiny_run(tmp_path / "cut", resume=True, qat_lr=0.5)
    resumed = _tiny_run(tmp_path / "cut", resume=True).model.state_dict()
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name


def _quantize_cmd(out, *extra):
    return [sys.executable, "-m", "maskaq", "quantize", "--model", "vit_fmnist", "--method", "maskaq",
            "--preset", "quick", "--wbits", "4", "--abits", "4", "--seed", "1", "--out", str(out),
            "--set", "synth_iters=30", "--set", "synth_batch_size=2", "--set", "qat_epochs=6",
            "--set", "refresh_every=3", "--set", "checkpoint_every_steps=2", *extra]


def _kill_when(proc, path, what):
    deadline = time.monotonic() + 600
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _student_state(out):
    from maskaq import zoo
    from maskaq.quant import load_quantized
    return load_quantized(out / "model", zoo.load("vit_fmnist")).state_dict()


@pytest.fixture(scope="module")
def uninterrupted_quantize(tmp_path_factory):
    from maskaq import zoo
    if "vit_fmnist" not in zoo.available():
        pytest.skip("the bundled teacher maskaq/zoo/vit_fmnist.safetensors is not there")
    whole = tmp_path_factory.mktemp("whole")
    subprocess.run(_quantize_cmd(whole), env=_env(), check=True, capture_output=True, timeout=900)
    assert not (whole / "checkpoint").exists()  # a finished run leaves its results, not its checkpoints
    return whole


@pytest.mark.parametrize("kill_at", ["synthesis", "qat"])
def test_killed_quantize_resumes_to_the_uninterrupted_student(tmp_path, kill_at, uninterrupted_quantize):
    whole = uninterrupted_quantize

    out = tmp_path / "killed"
    proc = subprocess.Popen(_quantize_cmd(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = (out / "checkpoint" / "round_0" / "batch_00000.safetensors" if kill_at == "synthesis"
              else out / "checkpoint" / "state.pt")
    _kill_when(proc, marker, kill_at)
    assert not (out / "model").exists()
    refused = subprocess.run(_quantize_cmd(out), env=_env(), capture_output=True, text=True, timeout=900)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    subprocess.run(_quantize_cmd(out, "--resume"), env=_env(), check=True, capture_output=True, timeout=900)
    assert not (out / "checkpoint").exists()
    resumed, uninterrupted = _student_state(out), _student_state(whole)
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
