import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def specs_dir():
    return SPECS


# ---------------------------------------------------------------- the quick subset: python -m pytest -m "not slow"
# Tests marked slow here besides their own @pytest.mark.slow: each took more than 1.2 s of CPU (process and
# child processes) on a shared 2-core machine (the figure after each). With them the quick subset runs every
# test file and every surgery module in under 2 minutes of CPU (README, "Tests"); the whole suite runs them all.
# A test renamed or removed here only leaves a stale line; a new expensive test should carry @pytest.mark.slow.
SLOW_TESTS = {
    # tests/test_bottleneck_family.py
    "tests/test_bottleneck_family.py::test_counts_bert_base_on_meta",  # 1.3 s
    "tests/test_bottleneck_family.py::test_counts_real_minilm",  # 1.4 s
    # tests/test_cli.py
    "tests/test_cli.py::test_every_shipped_spec_validates",  # 1.6 s
    "tests/test_cli.py::test_model_errors_are_one_line",  # 1.7 s
    "tests/test_cli.py::test_python_tags_are_refused_and_nothing_runs",  # 1.5 s
    "tests/test_cli.py::test_validate_reports_every_problem_once_and_exits_1",  # 1.5 s
    "tests/test_cli.py::test_validate_with_a_model_points_at_the_rule_that_matches_nothing",  # 3.6 s
    # tests/test_context_methods.py
    "tests/test_context_methods.py::test_training_lowers_the_loss[direft]",  # 1.9 s
    # tests/test_distributed.py
    "tests/test_distributed.py::test_ranks_stay_in_sync_and_only_adapters_train[llama-ddp]",  # 14.7 s
    # tests/test_engine.py
    "tests/test_engine.py::test_real_minilm_houlsby",  # 2.0 s
    # tests/test_export.py
    "tests/test_export.py::test_draw_with_matplotlib",  # 1.2 s
    "tests/test_export.py::test_onnx_houlsby_and_merged_lora_on_llama",  # 6.7 s
    "tests/test_export.py::test_onnx_prefix_tuning_on_llama",  # 3.9 s
    "tests/test_export.py::test_pt2_gpt2_with_tied_weights",  # 4.0 s
    "tests/test_export.py::test_torchscript_minigpt_runs_at_other_shapes",  # 1.7 s
    "tests/test_export.py::test_torchscript_transformers_model_runs_at_other_shapes",  # 1.8 s
    # tests/test_fuzz.py
    "tests/test_fuzz.py::test_apply_succeeds_or_raises_surgery_error_and_leaves_the_model_as_it_was",  # 3.3 s
    "tests/test_fuzz.py::test_validate_data_accepts_or_raises_spec_error",  # 1.5 s
    # tests/test_host_api.py
    "tests/test_host_api.py::test_fullgraph_capture_of_lora_houlsby_and_prefix_together",  # 4.9 s
    # tests/test_io.py
    "tests/test_io.py::test_round_trip_every_spec[adapterplus.yaml]",  # 1.6 s
    "tests/test_io.py::test_round_trip_every_spec[compacter.yaml]",  # 1.7 s
    "tests/test_io.py::test_round_trip_every_spec[compacterpp.yaml]",  # 2.0 s
    "tests/test_io.py::test_round_trip_every_spec[direft.yaml]",  # 1.3 s
    "tests/test_io.py::test_round_trip_every_spec[houlsby.yaml]",  # 1.3 s
    "tests/test_io.py::test_round_trip_every_spec[houlsby_inv.yaml]",  # 1.4 s
    "tests/test_io.py::test_round_trip_every_spec[ia3.yaml]",  # 1.6 s
    "tests/test_io.py::test_round_trip_every_spec[krona.yaml]",  # 1.9 s
    "tests/test_io.py::test_round_trip_every_spec[llama_adapter.yaml]",  # 2.1 s
    "tests/test_io.py::test_round_trip_every_spec[mam.yaml]",  # 2.3 s
    "tests/test_io.py::test_round_trip_every_spec[parallel.yaml]",  # 1.5 s
    "tests/test_io.py::test_round_trip_every_spec[qlora.yaml]",  # 1.4 s
    "tests/test_io.py::test_round_trip_every_spec[said.yaml]",  # 3.0 s
    "tests/test_io.py::test_round_trip_every_spec[sparse.yaml]",  # 1.5 s
    "tests/test_io.py::test_round_trip_every_spec[unipelt.yaml]",  # 4.0 s
    # tests/test_more_methods.py
    "tests/test_more_methods.py::test_dora_on_packed_multihead_attention_sees_each_slice_of_the_base_weight",  # 3.4 s
    "tests/test_more_methods.py::test_fastfood_memory_is_linear_in_D",  # 2.5 s
    "tests/test_more_methods.py::test_qlora_nf4_memory_error_training_and_merge_into_dequantized",  # 9.1 s
    "tests/test_more_methods.py::test_said_counts_shared_subspace_and_merge[bert]",  # 6.1 s
    "tests/test_more_methods.py::test_said_counts_shared_subspace_and_merge[llama]",  # 4.4 s
    "tests/test_more_methods.py::test_sparse_counts_magnitude_merge_and_saved_state[bert]",  # 1.5 s
    "tests/test_more_methods.py::test_sparse_counts_magnitude_merge_and_saved_state[llama]",  # 2.2 s
    "tests/test_more_methods.py::test_sparse_gradient_mask_is_the_largest_accumulated_squared_gradient",  # 3.0 s
    "tests/test_more_methods.py::test_sparse_random_is_seeded_and_trains_only_k_entries",  # 2.0 s
    # tests/test_peft_interop.py
    "tests/test_peft_interop.py::test_peft_lora_checkpoint_loads_with_peft_outputs[gpt2]",  # 1.4 s
    "tests/test_peft_interop.py::test_surgery_lora_writes_a_checkpoint_peft_loads[bert]",  # 1.4 s
    # tests/test_reliability.py
    "tests/test_reliability.py::test_attention_adapters_of_two_models_both_run",  # 1.5 s
    "tests/test_reliability.py::test_bad_spec[bad_option]",  # 1.3 s
    "tests/test_reliability.py::test_bad_spec[unknown_kind]",  # 1.3 s
    "tests/test_reliability.py::test_bad_spec[wrong_action]",  # 1.3 s
    "tests/test_reliability.py::test_bf16_merge_tolerance",  # 5.3 s
    "tests/test_reliability.py::test_load_failure_on_the_second_adapter",  # 1.4 s
    "tests/test_reliability.py::test_merge_unmerge_100_times_drifts_at_most_1e_5_in_fp32[False]",  # 10.7 s
    "tests/test_reliability.py::test_merge_unmerge_100_times_drifts_at_most_1e_5_in_fp32[True]",  # 10.3 s
    "tests/test_reliability.py::test_rewrites_that_cannot_fold_are_reported_by_merge",  # 1.4 s
    # tests/test_reparam.py
    "tests/test_reparam.py::test_all_wrap_methods_stacked_merge_to_the_base_graph[llama]",  # 2.3 s
    "tests/test_reparam.py::test_all_wrap_methods_stacked_merge_to_the_base_graph[minigpt]",  # 1.5 s
    "tests/test_reparam.py::test_lora_on_gpt2_conv1d_equals_explicit_reference",  # 1.2 s
    "tests/test_reparam.py::test_lora_options_init_scaling_dropout_and_targets",  # 1.3 s
    "tests/test_reparam.py::test_merge_errors_and_merge_then_remove_bakes_in",  # 1.5 s
    "tests/test_reparam.py::test_wrap_method_merges_and_unmerges_exactly[bert-ia3]",  # 1.2 s
    "tests/test_reparam.py::test_wrap_method_merges_and_unmerges_exactly[bert-lora]",  # 2.3 s
    "tests/test_reparam.py::test_wrap_method_merges_and_unmerges_exactly[gpt2-krona]",  # 1.5 s
    "tests/test_reparam.py::test_wrap_method_merges_and_unmerges_exactly[llama-krona]",  # 1.4 s
    "tests/test_reparam.py::test_wrap_method_merges_and_unmerges_exactly[minigpt-lora]",  # 1.5 s
    # tests/test_scale.py
    "tests/test_scale.py::test_materialize_from_safetensors_equals_apply_on_the_loaded_model",  # 1.9 s
    # tests/test_schema.py
    "tests/test_schema.py::test_surgery_schema_prints_the_committed_file",  # 1.7 s
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
