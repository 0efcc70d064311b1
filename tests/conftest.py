"""Session-wide settings of the test suite.

The suite is compile-bound: many tests, and the subprocesses of the `jlora train`
and fault-injection tests, compile the same small programs again. XLA's persistent
compilation cache, in a directory made fresh for this session (and inherited by the
pytest-xdist workers and every subprocess through the environment), compiles each
program once (measured: the suite took 12.7 min on 2 cores without it, 7.5 with it).
It changes what is timed, never what is computed: a cached executable is the one the
compiler builds for the same program.
"""

import os
import shutil
import tempfile

import pytest

_OWN_CACHE = _OWN_SHARED = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller sets it; workers and subprocesses inherit it
  _OWN_CACHE = tempfile.mkdtemp(prefix="jlora-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
if "JLORA_TEST_SESSION_DIR" not in os.environ:  # `tests.multidevice.once_per_session`'s results, for all workers
  _OWN_SHARED = tempfile.mkdtemp(prefix="jlora-tests-session-")
  os.environ["JLORA_TEST_SESSION_DIR"] = _OWN_SHARED


def pytest_unconfigure(config):
  for own in (_OWN_CACHE, _OWN_SHARED):
    if own is not None:
      shutil.rmtree(own, ignore_errors=True)


# The fast subset, `pytest -m "not slow"` (docs/development.md): what it leaves out is listed here, in one place.
# Whole files that run subprocesses, several devices or processes, notebooks, benchmarks, the docs build, the
# training application end to end or the fault injection; plus single tests of that nature in other files.
SLOW_FILES = {
    "test_bench_adapters.py", "test_benchmarks.py", "test_notebook_adapters.py", "test_notebook_sharding.py",
    "test_train_mesh.py", "test_sharding_models.py", "test_models_sharding.py", "test_multihost.py",
    "test_trainloop.py", "test_train_rundir.py", "test_train_faults.py", "test_train_hostile.py", "test_cli.py",
    "test_cli_adapters.py", "test_faults.py", "test_docs.py", "test_hf_equivalence.py", "test_generate.py",
    "test_plan.py",
    "test_compare.py", "test_notebook_compare.py",
}
SLOW_TESTS = {
    "test_notebook_is_committed_executed_and_still_runs", "test_on_eight_devices",
    "test_docs_mesh_example_runs_on_eight_devices", "test_mixed_generation_equals_generation_per_adapter",
    "test_jlora_train_quantizes_the_base_and_exports_what_it_trained",
}

# Tests of the library that take 4.5 s or more (summed over their parameters; measured on a fresh clone, 2 cores):
# the full run keeps them, the fast loop runs the rest of each file.
HEAVY_TESTS = {
    "test_body_adapted_head_left_alone_forward_merge_and_apply_merged_agree",
    "test_maxtext_nnx_dense_general_ships_registered_factored_equals_merged",
    "test_generic_all_linear_warns_about_3d_weights_and_the_head_is_left_alone",
    "test_a_damaged_checkpoint_prints_jloras_error_and_no_orbax_tracebacks",
    "test_a_layer_that_is_not_x_w_in_its_declared_layout_is_refused",
    "test_adapters_from_peft_files_join_a_set",
    "test_bank_each_example_equals_its_adapter_alone_and_gradients_too",
    "test_dora_and_qlora_match_the_linen_path",
    "test_dora_on_every_layer_kind",
    "test_factored_equals_merged",
    "test_factored_forward_equals_the_merged_weight",
    "test_gemma_layout_each_distinct_einsum_probed_once",
    "test_generate_with_apply_fn_equals_merged_and_compiles_once",
    "test_gradients_match_materialized",
    "test_gradients_treat_the_norm_as_a_constant",
    "test_hf_target_modules_factored_equals_merged",
    "test_hidden_states_load_from_task_and_base_checkpoints",
    "test_hidden_states_shapes_and_pooler_switch",
    "test_identity_at_init",
    "test_identity_at_init_factored_equals_merged",
    "test_converted_adapter_on_the_original_base_is_the_trained_model",
    "test_jlora_to_peft",
    "test_layouts_cat_and_svd_exact",
    "test_load_run_round_trip",
    "test_lora_and_dora_over_plain_and_quantized_bases",
    "test_lora_dropout_in_scan_differs_per_layer_and_is_differentiable",
    "test_lora_over_a_quantized_base_equals_lora_over_its_dequantized_copy",
    "test_magnitude_starts_at_the_column_norms_so_the_model_is_unchanged",
    "test_mixed_batch_equals_each_example_with_its_own_adapter",
    "test_multi_task_training_equals_training_each_adapter_alone",
    "test_new_head_needs_a_key",
    "test_peft_loads_the_converted_adapter_over_the_original_base",
    "test_peft_to_jlora",
    "test_pissa",
    "test_quantize_and_dequantize_on_a_mesh_keep_the_kernel_sharding",
    "test_pruning_methods_equal_peft",
    "test_registered_layer_with_its_own_bias_and_kernel_summed_einsum",
    "test_remat_same_loss_and_grads",
    "test_round_trip_every_layer_kind",
    "test_round_trip_is_exact_and_the_model_computes_the_same",
    "test_round_trip_of_trained_leaves",
    "test_same_weights_as_linen_give_the_same_adapters_outputs_and_gradients",
    "test_scan_layers_same_logits",
    "test_scanned_stack_and_checkpoint_round_trip",
    "test_scanned_stack_exports_per_layer",
    "test_single_adapter_equals_the_merged_model_and_gradients_reach_only_adapters",
    "test_stock_classes_are_not_probed",
    "test_token_ids_outside_the_vocabulary",
    "test_training_changes_only_trainable_leaves_split",
    "test_training_moves_only_adapters_and_the_codes_stay",
    "test_with_dropout_the_base_product_uses_the_dropped_input",
}


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.path.name in SLOW_FILES or getattr(item, "originalname", item.name) in SLOW_TESTS | HEAVY_TESTS:
      item.add_marker(pytest.mark.slow)


@pytest.fixture
def float32_matmuls():
  """Matmuls in float32 (`jax.default_matmul_precision`) while the test runs: comparisons against float32 references
  (PyTorch, merged kernels) then do not depend on the backend's default precision."""
  import jax

  with jax.default_matmul_precision("float32"):
    yield


@pytest.fixture
def restore_layer_registry():
  """Layer classes a test registers with `jlora.register_layer` are gone after it."""
  from jlora.frontends import layers

  saved = dict(layers._REGISTRY)
  yield
  layers._REGISTRY.clear()
  layers._REGISTRY.update(saved)
