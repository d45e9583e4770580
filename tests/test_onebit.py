"""1-bit Adam / 1-bit LAMB: bit packing, compression and volume theory here; the
distributed parity checks run for real under torchrun (tests/dist/check_onebit.py)."""
from __future__ import annotations

import math

import pytest
import torch

from impl.compressed_allreduce import (compressed_allreduce_bus_bytes, pack_signs, padded_numel, sign_compress,
                                       unpack_signs)
from impl.optim.onebit import onebit_bus_bytes_per_step, onebit_volume_ratio
from tests.test_distributed_units import torchrun


def test_pack_signs_is_msb_first_and_round_trips():
    x = torch.tensor([1.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, 0.0])  # bits 1000_0001
    assert pack_signs(x).tolist() == [0b1000_0001]
    y = torch.randn(8 * 125, generator=torch.Generator().manual_seed(0))
    y[::7] = 0.0
    packed = pack_signs(y)
    assert packed.dtype == torch.uint8 and packed.numel() * 32 == y.numel() * y.element_size()  # 1/32 of fp32
    assert torch.equal(unpack_signs(packed), torch.where(y >= 0, 1.0, -1.0))  # sign(0) = +1, as DeepSpeed


def test_sign_compress_of_a_known_vector():
    x = torch.tensor([3.0, -4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    packed, scale, error = sign_compress(x)
    s = 5.0 / math.sqrt(8)  # ‖x‖/√N
    assert scale.item() == pytest.approx(s)
    assert packed.tolist() == [0b1011_1111]
    assert torch.allclose(error, x - s * torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    # Error feedback is lossless bookkeeping: decompressed + error = input.
    assert torch.allclose(unpack_signs(packed) * scale + error, x)


def test_padding_and_wire_bytes_theory():
    assert padded_numel(1000, 2) == 1008 and padded_numel(1008, 2) == 1008 and padded_numel(1, 3) == 24
    # n = 2: all-to-all of 1008/8 + 2·4 bytes and all-gather of the same, each × (n−1)/n.
    assert compressed_allreduce_bus_bytes(1000, 2) == 2 * (126 + 8) * 0.5
    assert compressed_allreduce_bus_bytes(1000, 1) == 0.0
    assert onebit_bus_bytes_per_step(1000, 2, compressed=False) == 4000  # 2(n−1)/n · 4 · numel
    assert onebit_bus_bytes_per_step(1000, 2, compressed=False, bytes_per_grad=2) == 2000
    big = 10 ** 8
    for b, r in ((4, 32), (2, 16)):
        full = onebit_bus_bytes_per_step(big, 8, compressed=False, bytes_per_grad=b)
        ratio = full / onebit_bus_bytes_per_step(big, 8, compressed=True)
        assert ratio == pytest.approx(r, rel=1e-5)


def test_whole_run_volume_ratio():
    assert onebit_volume_ratio(1.0, 16) == 1.0
    assert onebit_volume_ratio(0.0, 16) == 16.0
    assert onebit_volume_ratio(0.15, 16) == pytest.approx(1 / (0.15 + 0.85 / 16))  # ≈ 4.9×: warm-up dominates
    with pytest.raises(ValueError):
        onebit_volume_ratio(1.5, 16)


def test_onebit_optimizers_match_references_under_torchrun():
    out = torchrun("check_onebit.py", 2)
    assert "OK allreduce exact" in out
    assert out.count("OK warmup ") == 2
    assert out.count("OK compressed ") == 4, out
