"""The public OTPrune release's per-image selection, transcribed literally (one image, B = 1).

The benchmarks' baseline ("official") and the tests' oracle for ``compat="official"``: its dtype
handling, its host sync every greedy step (``.item()``), its repair loop and its
``list(set(...))`` output order are kept on purpose.
A batch is handled as the release does it: one image after another (:func:`official_batch`).
"""

from __future__ import annotations

from typing import List

import torch


def _greedy_select(kernel_matrix, max_length, item_size, device, dtype, epsilon=1e-100):
    cis = torch.zeros((max_length, item_size), device=device, dtype=dtype)
    di2s = torch.clone(torch.diag(kernel_matrix))
    selected_items = []
    selected_item = torch.argmax(di2s).item()
    selected_items.append(selected_item)
    while len(selected_items) < max_length:
        k = len(selected_items) - 1
        ci_optimal = cis[:k, selected_item]
        di_optimal = torch.sqrt(di2s[selected_item])
        elements = kernel_matrix[selected_item, :]
        eis = (elements - (ci_optimal.unsqueeze(0) @ cis[:k, :]).squeeze()) / di_optimal
        cis[k, :] = eis
        di2s -= torch.square(eis)
        selected_item = torch.argmax(di2s).item()
        if di2s[selected_item] < epsilon:
            break
        selected_items.append(selected_item)
    return selected_items


@torch.no_grad()
def official_select(visual_feature_vectors: torch.Tensor, threshold_ratio: float, gamma: float = 0.01) -> torch.Tensor:
    """(k,) int64 indices (unsorted, list(set()) order) the public loop keeps for one (N, d) image."""
    image_feature_length = visual_feature_vectors.shape[0]
    device_cuda = visual_feature_vectors.device
    dtype = visual_feature_vectors.dtype
    visual_feature_vectors = visual_feature_vectors / visual_feature_vectors.norm(dim=-2, keepdim=True).to(torch.float32)
    visual_feature_vectors = visual_feature_vectors @ visual_feature_vectors.T
    max_length = int(round(threshold_ratio * image_feature_length))
    kernel_matrix = torch.eye(image_feature_length).to(device_cuda) + gamma * visual_feature_vectors @ visual_feature_vectors.T
    return official_from_kernel(kernel_matrix, max_length, image_feature_length, device_cuda, dtype)


def official_from_kernel(kernel_matrix, max_length, item_size, device_cuda, dtype) -> torch.Tensor:
    """The release's greedy plus its repair loop on a given kernel (split out only for testing)."""
    selected_items = _greedy_select(kernel_matrix, max_length, item_size, device_cuda, dtype)
    while len(set(selected_items)) < max_length:
        for i in selected_items:
            kernel_matrix[i, :] = 0
            kernel_matrix[:, i] = 0
        index_new = _greedy_select(kernel_matrix, max_length - len(set(selected_items)), item_size, device_cuda, dtype)
        selected_items.extend(index_new)
    assert len(set(selected_items)) == max_length
    return torch.tensor(list(set(selected_items)), dtype=torch.long, device=device_cuda)


def official_batch(features: torch.Tensor, ratio: float) -> List[torch.Tensor]:
    """The release's way of handling a (B, N, d) batch: :func:`official_select` image by image."""
    return [official_select(features[b], ratio) for b in range(features.shape[0])]
