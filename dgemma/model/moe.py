"""The top-k mixture of experts that runs beside the dense MLP in every layer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..config import TextConfig
from .layers import RMSNorm, gelu_tanh

# grouped GEMM over experts: torch.nn.functional.grouped_mm (torch >= 2.10) or the older private name
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class Router(nn.Module):
    """Reads the residual: RMSNorm (no scale) * scale * hidden^-0.5 -> logits -> fp32 softmax -> top-k ->
    renormalise -> * per_expert_scale."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.top_k = config.top_k_experts
        self.root_size = config.hidden_size**-0.5
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> weights (N, k), expert indices (N, k)."""
        scores = self.proj(self.norm(x) * self.scale * self.root_size)  # (N, E)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class Experts(nn.Module):
    """Expert weights stored as 3-D tensors, in the released layout:
    gate_up_proj (E, 2*I, H) and down_proj (E, H, I)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.zeros(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.zeros(e, h, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x (N, H); weights, index (N, k) -> (N, H).

        Routed (token, slot) pairs are sorted by expert so each expert runs one matmul over its tokens; the
        per-token sum over the k slots happens at the end, in slot order. (This is also how the reference
        computes it, so results agree bit for bit.)"""
        N, k = index.shape
        flat_expert = index.reshape(-1)  # (N*k,) token-major
        _, perm = torch.sort(flat_expert)
        x_sorted = x[perm // k]  # (N*k, H), grouped by expert
        y_sorted = self.expert_mlps(x_sorted, flat_expert)
        y_sorted = y_sorted * weights.reshape(-1)[perm, None].to(y_sorted.dtype)
        y = torch.empty_like(y_sorted)
        y[perm] = y_sorted  # back to (token, slot) order
        return y.view(N, k, -1).sum(dim=1)

    def expert_mlps(self, x_sorted: torch.Tensor, flat_expert: torch.Tensor) -> torch.Tensor:
        """x_sorted (N*k, H), rows grouped by expert in expert order -> each row through its expert's gated MLP
        (N*k, H). A quantized subclass whose kernels read packed weights replaces this."""
        gate_up, down = self.weights(x_sorted.dtype)
        if x_sorted.is_cuda and _GROUPED_MM is not None:  # as the reference does on CUDA, in every dtype
            return self._grouped(x_sorted, flat_expert, gate_up, down)
        return self._per_expert(x_sorted, flat_expert, gate_up, down)

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up (E, 2I, H), down (E, H, I)) to compute with; a quantized subclass dequantizes here."""
        return self.gate_up_proj, self.down_proj

    def _grouped(self, x_sorted: torch.Tensor, flat_expert: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor) -> torch.Tensor:
        """One grouped GEMM per projection over all experts; the group ends stay on the device, so there is no
        host sync (and the layer can be captured in a CUDA graph)."""
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x_sorted.device)
        counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert, dtype=torch.int32))
        ends = torch.cumsum(counts, dim=0, dtype=torch.int32)
        gate, up = _GROUPED_MM(x_sorted, gate_up.transpose(-2, -1), offs=ends).chunk(2, dim=-1)
        return _GROUPED_MM(gelu_tanh(gate) * up, down.transpose(-2, -1), offs=ends)

    def _per_expert(self, x_sorted: torch.Tensor, flat_expert: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
        """One torch.mm per expert that has tokens (CPU, and dtypes the grouped kernel lacks)."""
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()  # one host sync per layer
        outputs = []  # per-expert outputs, contiguous in expert order like the rows of x_sorted
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            gate, up = torch.mm(x_sorted[start:start + n], gate_up[e].t()).chunk(2, dim=-1)
            outputs.append(torch.mm(gelu_tanh(gate) * up, down[e].t()))
            start += n
        return torch.cat(outputs)
