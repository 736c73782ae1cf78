"""DDP on the CPU, 2 gloo ranks against one process on the concatenated batch (the cases are in
distributed_cases.py; one spawn of two workers runs them all, imports being most of the time):

* every selection (and the backprop planner) chooses the same positions on every rank, from the whole batch's
  statistics;
* 3 AdamW steps under DDP give the one-process deltas and outputs (merged and unmerged, sparse deltas and
  S²FT), and so does SpIEL regrowth, whose choices stay identical across ranks;
* the position buffers stay out of DDP's per-forward broadcast, and ranks that differ are refused;
* W4A4KV4 quantization-aware training (ftcore.QuantConfig) under DDP lands on the one-process masters."""

import pytest
import torch

import distributed_cases
import spawned

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawned.spawn(distributed_cases.worker, str(tmp_path_factory.mktemp("distributed_cases")))


result = spawned.result


@pytest.mark.parametrize("name", list(distributed_cases.SELECTIONS))
def test_every_rank_selects_the_same_positions(results, name):
    r = result(results, f"selection[{name}]")
    assert r["identical"]
    assert r.get("as_one_process", True)


def test_the_backprop_planner_plans_alike_on_every_rank(results):
    r = result(results, "planner")
    assert r["identical"] and r["as_one_process"]


@pytest.mark.parametrize("name", list(distributed_cases.TRAINING))
def test_ddp_trains_as_one_process_on_the_whole_batch(results, name):
    r = result(results, f"training[{name}]")
    assert r["identical"] and r["same_positions_as_one_process"]
    assert r["delta_max_diff"] < 1e-5 and r["output_max_diff"] < 1e-5, r


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_regrowth_under_ddp_chooses_as_one_process(results, mode):
    r = result(results, f"regrowth[{mode}]")
    assert r["moved"] and r["identical"] and r["same_positions_as_one_process"] and r["identical_with_few_candidates"]
    assert r["delta_max_diff"] < 1e-5 and r["output_max_diff"] < 1e-5, r


def test_position_buffers_stay_out_of_ddps_broadcast(results):
    assert result(results, "buffers_stay_out_of_the_broadcast")["ignored"]


def test_ranks_that_chose_differently_are_refused(results):
    assert result(results, "ranks_that_differ_are_refused")["refused"]


def test_one_rank_alone_can_adapt_load_and_switch(results):
    """No collective outside DDP's forward and the data-driven choices: nothing hangs."""
    assert result(results, "one_rank_alone")["ran"]


def test_quantization_aware_training_under_ddp_matches_one_process(results):
    r = result(results, "quantization_aware_training")
    assert r["identical"]
    assert r["share_of_entries_off"] < 1e-3 and r["param_max_diff"] < 1e-3 and r["output_max_diff"] < 1e-4, r
