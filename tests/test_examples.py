"""The launch recipes in examples/ run: examples/train.py (an ftcore model in the transformers Trainer, with
ftcore.SaveAdapterCallback) launched by `accelerate launch` on 2 CPU processes with the DDP, FSDP2 and
DeepSpeed ZeRO-3 configs of examples/accelerate/. Every engine saves the adapter in each checkpoint, and all
three train to the same adapter, which loads in one process."""

import os
import subprocess
import sys

import pytest
import torch

import ftcore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("ddp", "fsdp2", "zero3")
STEPS = 4

pytestmark = pytest.mark.distributed


def deepspeed_imports() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import deepspeed"], env={**os.environ, "DS_ACCELERATOR": "cpu"},
                           capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for engine in ENGINES:
        if engine == "zero3" and not deepspeed_imports():
            out[engine] = None
            continue
        folder = str(tmp_path_factory.mktemp(engine))
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   os.path.join(ROOT, "examples", "accelerate", f"{engine}.yaml"),
                   os.path.join(ROOT, "examples", "train.py"), "--output-dir", folder,
                   "--max-steps", str(STEPS), "--save-steps", str(STEPS // 2)]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        out[engine] = (folder, done)
    return out


def finished(runs, engine):
    if runs[engine] is None:
        pytest.skip("deepspeed does not import here")
    folder, done = runs[engine]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert f"2 processes, {STEPS} steps" in done.stdout, done.stdout[-3000:]
    return folder


@pytest.mark.parametrize("engine", ENGINES)
def test_the_trainer_script_runs_and_saves_the_adapter_at_each_checkpoint(runs, engine):
    folder = finished(runs, engine)
    for place in (f"checkpoint-{STEPS // 2}", f"checkpoint-{STEPS}", ""):
        ftcore.read_adapter(os.path.join(folder, place, "ftcore_adapter"))  # complete, checksum verified


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_every_engine_trains_the_adapter_ddp_trains(runs, engine):
    mine = ftcore.read_adapter(os.path.join(finished(runs, engine), "ftcore_adapter"))
    ddp = ftcore.read_adapter(os.path.join(finished(runs, "ddp"), "ftcore_adapter"))
    assert mine.layers.keys() == ddp.layers.keys()
    for name, record in ddp.layers.items():
        assert torch.equal(mine.layers[name].tensors["indices"], record.tensors["indices"])
        torch.testing.assert_close(mine.layers[name].tensors["values"], record.tensors["values"], rtol=0, atol=1e-5)


def test_the_saved_adapter_loads_in_one_process(runs):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import train
    finally:
        sys.path.pop(0)
    model = ftcore.load_adapter(train.small_llama(0), os.path.join(finished(runs, "fsdp2"), "ftcore_adapter"))
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert model(input_ids=ids).logits.isfinite().all()
