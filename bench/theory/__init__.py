"""The papers' formulas, as functions (DESIGN.md "Theory"). Pure Python, no torch.

One module per technique family; this package re-exports their public names, so
``from bench.theory import model_state_bytes`` reads as the contract does.
"""
from __future__ import annotations

from bench.theory.memory import (OPTIMIZER_STATE_BYTES, PRECISION_BYTES, ADAM8BIT_BLOCK, ADAM8BIT_MIN_SIZE, optimizer_state_bytes, model_state_bytes, activation_bytes_per_layer, activation_values_per_layer, logits_transient_bytes)  # noqa: F401
from bench.theory.data_parallel import (dp_comm_elements, allreduce_bytes_sent, onebit_comm_bytes, onebit_volume_reduction)  # noqa: F401
from bench.theory.pipeline import (bubble_fraction, pipeline_p2p_bytes)  # noqa: F401
from bench.theory.tensor_parallel import (tp_param_shapes, tp_local_params, tp_comm_bytes, pp_tp_comm_by_rank)  # noqa: F401
from bench.theory.ring import (ring_sp_comm_bytes)  # noqa: F401
from bench.theory.tensor_parallel_nd import (tp2d_param_shapes, tp2d_comm_bytes, tp3d_param_shapes, tp3d_local_params, tp3d_comm_bytes)  # noqa: F401
from bench.theory.convergence import (loss_floor)  # noqa: F401
from bench.theory.record import (THEORY_VERSION, predict, ratios)  # noqa: F401

__all__ = ['OPTIMIZER_STATE_BYTES', 'PRECISION_BYTES', 'ADAM8BIT_BLOCK', 'ADAM8BIT_MIN_SIZE', 'optimizer_state_bytes', 'model_state_bytes', 'activation_bytes_per_layer', 'activation_values_per_layer', 'logits_transient_bytes', 'dp_comm_elements', 'allreduce_bytes_sent', 'onebit_comm_bytes', 'onebit_volume_reduction', 'bubble_fraction', 'pipeline_p2p_bytes', 'tp_param_shapes', 'tp_local_params', 'tp_comm_bytes', 'pp_tp_comm_by_rank', 'ring_sp_comm_bytes', 'tp2d_param_shapes', 'tp2d_comm_bytes', 'tp3d_param_shapes', 'tp3d_local_params', 'tp3d_comm_bytes', 'loss_floor', 'THEORY_VERSION', 'predict', 'ratios']
