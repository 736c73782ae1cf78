"""ftcore under the engines that shard parameters, on the CPU: 2 gloo ranks against one process on the
concatenated batch (the cases are in sharded_cases.py; one spawn of two workers runs them all).

* FSDP2, FSDP1 (use_orig_params) and DeepSpeed ZeRO-2/3, sparse deltas and S²FT, default (merged) and
  unmerged mode: after 3 AdamW steps the deltas and the full-batch outputs are the one process's (1e-5), and
  the adapter saved from every rank reloads in one process to the same outputs;
* merged mode falls back to the exact unmerged path where the weight is sharded (with a warning naming the
  engine) and stays merged under ZeRO-2, whose weights are whole;
* under ZeRO-3 apply and load_adapter read W0 inside a gather: the selection is the one process's;
* a bf16 DeepSpeed run (ZeRO-2 and 3) saves the fp32 master values, not the bf16 copies;
* RotatedQuantLinear trains under FSDP2 and ZeRO-2/3 as in one process;
* a full state dict of the sharded run (torch.distributed.checkpoint) loads back into it;
* what cannot be done exactly is refused: a merge held when the engine sharded the weight, adapting a model
  already wrapped, SpIEL regrowth under sharding, a merged model's state dict loaded into a sharded one."""

import pytest
import torch

import sharded_cases
import spawned

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawned.spawn(sharded_cases.worker, str(tmp_path_factory.mktemp("sharded_cases")))


def result(results, name):
    if "zero" in name and not results["deepspeed"]:
        pytest.skip("deepspeed does not import here")
    return spawned.result(results, name)


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
@pytest.mark.parametrize("method", list(sharded_cases.CONFIGS))
@pytest.mark.parametrize("engine", sharded_cases.ENGINES)
def test_training_under_the_engine_is_one_process_on_the_whole_batch(results, engine, method, mode):
    r = result(results, f"training[{engine}-{method}-{mode}]")
    assert r["delta_max_diff"] < 1e-5 and r["output_max_diff"] < 1e-5, r
    assert r["reloaded_output_max_diff"] < 1e-5, r
    sharded = engine != "zero2"
    assert r["unmerged"] == (sharded or mode == "unmerged")
    assert r["warned"] == (sharded and mode == "merged")
    if engine == "fsdp2":
        assert r["originals_freed"]  # the unsharded weights fully_shard replaced are not kept alive


@pytest.mark.parametrize("selection", list(sharded_cases.ZERO3_SELECTIONS))
def test_zero3_apply_and_load_read_w0_inside_a_gather(results, selection):
    r = result(results, f"zero3_apply_and_load[{selection}]")
    assert r["partitioned"] and r["same_positions"], r
    assert r["delta_max_diff"] < 1e-5 and r["output_max_diff"] < 1e-5 and r["reloaded_output_max_diff"] < 1e-5, r
    assert r["loaded_under_zero3_output_max_diff"] < 1e-5, r


@pytest.mark.parametrize("stage", [2, 3])
def test_a_bf16_deepspeed_run_saves_the_fp32_master_values(results, stage):
    r = result(results, f"bf16_saves_the_fp32_master[zero{stage}]")
    assert r == {"engine_dtype_bf16": True, "saved_fp32": True, "saved_the_master": True, "finer_than_bf16": True}


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_rotated_quant_linear_trains_under_the_engine(results, engine):
    assert result(results, f"rotated_quant[{engine}]")["weight_max_diff"] < 1e-5


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_whole_model_qat_trains_under_the_engine_as_one_process(results, engine):
    r = result(results, f"whole_model_qat[{engine}]")
    assert r["share_of_entries_off"] < 1e-3 and r["param_max_diff"] < 1e-3 and r["output_max_diff"] < 1e-4, r


def test_a_sharded_checkpoint_loads_back_into_the_sharded_model(results):
    assert result(results, "fsdp2_state_dict_round_trip")["output_max_diff"] == 0


@pytest.mark.parametrize("name", ["held_merge_refused", "held_merge_on_one_rank_refused", "apply_after_wrapping_refused", "regrowth_refused",
                                  "merged_state_dict_refused", "regrowth_refused_under_zero2"])
def test_what_cannot_be_exact_is_refused(results, name):
    assert result(results, name)["refused"]


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_the_fused_lm_loss_trains_under_the_engine(results, engine):
    r = result(results, f"fused_loss[{engine}]")
    assert r["delta_max_diff"] < 1e-5 and r["output_max_diff"] < 1e-5, r
