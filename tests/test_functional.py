"""The method's pure tensor functions: scaling, initialisation, ΔW and the fused-slice B layout."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.functional import compress_sliced_B, delta_weight, expand_sliced_B, init_lora_A, lora_scale


def test_scale_is_alpha_over_r_or_over_sqrt_r_with_rslora():
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, use_rslora=True) == 8.0
    assert lora_scale(3, 9, use_rslora=True) == pytest.approx(1.0)


def test_kaiming_init_matches_nn_linear_default_bound():
    A = torch.empty(64, 256)
    torch.manual_seed(0)
    init_lora_A(A, "kaiming", r=64)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=√5) on fan_in k gives U(-1/√k, 1/√k)
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.9 * bound


def test_gaussian_init_has_std_one_over_r():
    A = torch.empty(8, 4096)
    torch.manual_seed(0)
    init_lora_A(A, "gaussian", r=8)
    assert A.mean().abs() < 0.005  # 7 standard errors
    assert A.std().item() == pytest.approx(1 / 8, rel=0.02)


def test_init_on_meta_is_a_no_op():
    A = torch.empty(4, 8, device="meta")
    init_lora_A(A, "kaiming", r=4)
    assert A.is_meta


def test_delta_weight_linear_is_scale_B_A_in_fp32():
    A, B = torch.randn(3, 5), torch.randn(7, 3)
    torch.testing.assert_close(delta_weight(A, B, 0.5), 0.5 * B @ A)
    half = delta_weight(A.half(), B.half(), 2.0)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, 2.0 * B.half().float() @ A.half().float())


def test_delta_weight_fan_in_fan_out_and_embedding_are_transposed():
    A, B = torch.randn(3, 5), torch.randn(7, 3)
    torch.testing.assert_close(delta_weight(A, B, 1.0, fan_in_fan_out=True), (B @ A).T)
    torch.testing.assert_close(delta_weight(A, B, 1.0, embedding=True), (B @ A).T)


def test_delta_weight_conv_has_the_kernel_shape():
    A, B = torch.randn(2, 3, 3, 3), torch.randn(6, 2, 1, 1)
    delta = delta_weight(A, B, 1.5)
    assert delta.shape == (6, 3, 3, 3)
    expected = 1.5 * torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)
    torch.testing.assert_close(delta, expected)


def test_expand_sliced_B_is_block_structured_and_compress_inverts_it():
    B = torch.randn(2, 4, 3)  # two enabled slices of 4 rows, r=3
    enabled = [True, False, True]
    dense = expand_sliced_B(B, enabled)
    assert dense.shape == (12, 6)
    torch.testing.assert_close(dense[0:4, 0:3], B[0])
    torch.testing.assert_close(dense[8:12, 3:6], B[1])
    assert torch.count_nonzero(dense[4:8]) == 0
    assert torch.count_nonzero(dense[0:4, 3:6]) == 0
    torch.testing.assert_close(compress_sliced_B(dense, enabled, r=3), B)


def test_compress_sliced_B_refuses_weight_outside_the_blocks():
    dense = expand_sliced_B(torch.randn(2, 4, 3), [True, False, True])
    dense[5, 1] = 1.0  # a row of the k slice, which is not adapted
    with pytest.raises(ValueError, match="block structured"):
        compress_sliced_B(dense, [True, False, True], r=3)


def test_sliced_delta_only_touches_enabled_slices():
    A, B = torch.randn(6, 5), torch.randn(2, 4, 3)
    delta = delta_weight(A, B, 1.0, enabled=[True, False, True])
    assert delta.shape == (12, 5)
    assert torch.count_nonzero(delta[4:8]) == 0
    torch.testing.assert_close(delta[0:4], B[0] @ A[0:3])
    torch.testing.assert_close(delta[8:12], B[1] @ A[3:6])
