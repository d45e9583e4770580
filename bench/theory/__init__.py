"""The papers' formulas, as functions (docs/design.md "Theory"). Pure Python, no torch.

One module per technique family; this package re-exports their public names, so
``from bench.theory import model_state_bytes`` reads as the contract does.
"""
from __future__ import annotations

from bench.theory.memory import (OPTIMIZER_STATE_BYTES, PRECISION_BYTES, ADAM8BIT_BLOCK, ADAM8BIT_MIN_SIZE, optimizer_state_bytes, model_state_bytes, activation_bytes_per_layer, activation_values_per_layer, logits_transient_bytes)  # noqa: F401
from bench.theory.data_parallel import (dp_comm_elements, dp_comm_cost, allreduce_bytes_sent, allreduce_cost, onebit_comm_bytes, onebit_comm_cost, onebit_volume_reduction)  # noqa: F401
from bench.theory.cost import (Cost)  # noqa: F401
from bench.theory.pipeline import (bubble_fraction, pipeline_p2p_bytes)  # noqa: F401
from bench.theory.tensor_parallel import (tp_param_shapes, tp_local_params, tp_comm_bytes, tp_comm_cost, pp_tp_comm_by_rank, pp_tp_cost_by_rank, megatron_layer_bytes)  # noqa: F401
from bench.theory.ring import (ring_sp_comm_bytes, ring_sp_comm_cost, ring_attention_layer_bytes)  # noqa: F401
from bench.theory.tensor_parallel_nd import (tp2d_param_shapes, tp2d_comm_bytes, tp2d_comm_cost, tp3d_param_shapes, tp3d_local_params, tp3d_comm_bytes, tp3d_comm_cost, summa_linear_bytes, cube_linear_bytes)  # noqa: F401
from bench.theory.convergence import (loss_floor)  # noqa: F401
from bench.theory.record import (THEORY_VERSION, predict, ratios)  # noqa: F401

__all__ = ['OPTIMIZER_STATE_BYTES', 'PRECISION_BYTES', 'ADAM8BIT_BLOCK', 'ADAM8BIT_MIN_SIZE', 'optimizer_state_bytes', 'model_state_bytes', 'activation_bytes_per_layer', 'activation_values_per_layer', 'logits_transient_bytes', 'dp_comm_elements', 'dp_comm_cost', 'allreduce_bytes_sent', 'allreduce_cost', 'onebit_comm_bytes', 'onebit_comm_cost', 'onebit_volume_reduction', 'Cost', 'bubble_fraction', 'pipeline_p2p_bytes', 'tp_param_shapes', 'tp_local_params', 'tp_comm_bytes', 'tp_comm_cost', 'pp_tp_comm_by_rank', 'pp_tp_cost_by_rank', 'megatron_layer_bytes', 'ring_sp_comm_bytes', 'ring_sp_comm_cost', 'ring_attention_layer_bytes', 'tp2d_param_shapes', 'tp2d_comm_bytes', 'tp2d_comm_cost', 'tp3d_param_shapes', 'tp3d_local_params', 'tp3d_comm_bytes', 'tp3d_comm_cost', 'summa_linear_bytes', 'cube_linear_bytes', 'loss_floor', 'THEORY_VERSION', 'predict', 'ratios']
