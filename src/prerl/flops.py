"""FLOPs of the update's forward and backward passes, from the shapes forwarded and the model's shape.

Model FLOPs, the convention of MFU (PaLM, Appendix B; Megatron-LM): every matmul of the network
counted once in forward and twice in backward (input and weight gradients); work the hardware does
again is not counted (gradient checkpointing's recomputed blocks, the chunked log-prob head's
recomputed chunks), nor elementwise work (norms, activations, softmax), nor LoRA's small adapters.
A dense decoder (Llama, Qwen2/3, SmolLM2, the tiny model): per layer the q, k, v, o projections
and a gated MLP (gate, up, down); attention scores over the full padded width (the padded mask
runs dense kernels, so no causal halving), as ``torch.utils.flop_counter`` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a dense decoder that its FLOPs depend on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a Hugging Face config (its text config for multimodal ones)."""
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = c.num_attention_heads
        return cls(
            layers=c.num_hidden_layers, hidden=c.hidden_size, heads=heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            intermediate=c.intermediate_size, vocab=c.vocab_size,
        )

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one block's matmuls: q and o (hidden x heads*head_dim), k and v (hidden x
        kv_heads*head_dim), gate, up and down (hidden x intermediate)."""
        attention = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return attention + 3 * self.hidden * self.intermediate


def _parts(shape: ModelShape, rows: int, width: int, head_tokens: int) -> tuple[int, int]:
    """Forward FLOPs of (the weight matmuls: blocks and LM head, attention's score matmuls)."""
    dense = 2 * shape.layers * shape.layer_matmul_params * rows * width
    head = 2 * shape.hidden * shape.vocab * head_tokens
    attention = 4 * shape.layers * shape.heads * shape.head_dim * rows * width * width
    return dense + head, attention


def forward_flops(shape: ModelShape, rows: int, width: int, head_tokens: int) -> int:
    """Model FLOPs of one forward pass over ``rows`` sequences padded to ``width`` tokens.

    Args:
        shape: the decoder's shape.
        rows, width: the (rows, width) input ids forwarded (padding included: the hardware runs it).
        head_tokens: positions projected onto the vocabulary (the LM head): rows x (response
            width + 1) with ``logits_to_keep``, or only the real response tokens with the chunked head.
    Returns:
        2 x (block matmul weights x rows x width + hidden x vocab x head_tokens)
        + 4 x layers x heads x head_dim x rows x width^2 (scores q.k and their weighted sum of v).
    """
    weights, attention = _parts(shape, rows, width, head_tokens)
    return weights + attention


def training_flops(shape: ModelShape, rows: int, width: int, head_tokens: int, weights_trained: bool = True) -> int:
    """Model FLOPs of one forward + backward pass (arguments as in ``forward_flops``).

    Backward is twice the forward when every weight is trained (gradients of each matmul's input
    and weight): 6 x params x tokens for the weights, plus 12 x layers x heads x head_dim x width^2
    per row for attention. With ``weights_trained=False`` (LoRA / QLoRA: a frozen base) the weight
    matmuls need only their input gradients (4 x params x tokens); attention still costs 3 x forward.
    """
    weights, attention = _parts(shape, rows, width, head_tokens)
    return (3 if weights_trained else 2) * weights + 3 * attention
