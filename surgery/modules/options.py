"""The options of every built-in module kind: what a spec's `module:` may say, validated without torch.

Each module class (surgery/modules/<kind>.py) takes its `Options` from here, so that loading and validating a
spec (`surgery validate specs/*.yaml`, a pre-commit hook) needs pydantic only; the registry finds a built-in
kind's options here before its module is imported (`BUILTIN`).
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from surgery.modules.registry import Options

# transformers' get_activation names, which AdapterHub resolves non_linearity with (bottleneck.ACTIVATIONS maps
# each to its module; a test checks the two agree)
ACTIVATION_NAMES = ("relu", "gelu", "swish", "silu", "tanh", "sigmoid", "gelu_new", "gelu_pytorch_tanh",
                    "quick_gelu", "mish", "relu6", "leakyrelu", "identity", "linear")


class PHMOptions(Options):
    """AdapterHub's BnConfig PHM knobs (same names and defaults), for modules whose projections are PHM layers."""

    phm_dim: int = Field(4, ge=1, description="n: the number of Kronecker terms and the rule matrices' size.")
    shared_phm_rule: bool = Field(True, description="One rule tensor C for every PHM layer of the adapter set.")
    factorized_phm_rule: bool = Field(False, description="C = left (n×n×1) · right (n×1×n).")
    factorized_phm_W: bool = Field(True, description="Each block W_i = W_left_i · W_right_i of rank phm_rank.")
    phm_rank: int = Field(1, ge=1, description="The rank of the factorized blocks.")
    phm_c_init: Literal["normal", "uniform"] = Field(
        "normal", description="Rule init: N(0, phm_init_range) shared / N(0, 0.01) own, or uniform.")
    phm_init_range: float = Field(1e-4, gt=0, description="Std of the shared rule's (and the `normal` W) init.")
    learn_phm: bool = Field(True, description="Whether the rule tensor trains.")
    hypercomplex_nonlinearity: Literal["glorot-uniform", "glorot-normal", "phm", "normal"] = Field(
        "glorot-uniform", description="Init of the W blocks: xavier uniform, xavier normal (glorot-normal, phm), or "
                                      "N(0, phm_init_range).")
    phm_bias: bool = Field(True, description="A bias on each PHM layer.")


class LoRAOptions(Options):
    kind: Literal["lora"] = "lora"
    supported_actions = ("wrap",)
    r: int = Field(8, ge=1, description="Rank of the update B·A.")
    alpha: float = Field(8, gt=0, description="Scaling numerator: s = alpha/r (alpha/sqrt(r) with use_rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the op's input before A (activation path only).")
    use_rslora: bool = Field(False, description="Rank-stabilized scaling alpha/sqrt(r).")
    init: Literal["kaiming", "gaussian", "pissa", "olora", "loftq"] = Field(
        "kaiming", description="kaiming/gaussian: A's init, B zero. pissa/olora: A and B from W's top-r SVD or QR, "
                               "the initial product subtracted in the forward (the op equals the base op at init). "
                               "loftq: s·B·A = top-r SVD of W − NF4(W); then call surgery.quantize_nf4(model). "
                               "pissa/olora/loftq: linear ops only.")
    use_gating: bool = Field(False, description="UniPELT: a learned gate sigmoid(Linear(x)) averaged over the "
                                                "sequence replaces the scaling (input-dependent, so not mergeable).")
    loftq_iter: int = Field(1, ge=1, le=64, description="init loftq: alternating quantize / low-rank steps "
                                                        "(PEFT's LoftQConfig.loftq_iter).")
    loftq_quantizer: Literal["torchao", "bitsandbytes"] = Field(
        "torchao", description="init loftq: torchao's NF4 (double-quantized scales, what surgery.quantize_nf4 "
                               "stores) or bitsandbytes' NF4 with float32 scales (PEFT's LoftQ).")


PositiveFactor = Annotated[float, Field(gt=0)]
Width = Annotated[int, Field(ge=1)]


class _BottleneckFields(Options):
    kind: Literal["bottleneck"] = "bottleneck"
    reduction_factor: Union[PositiveFactor, dict[Union[int, str], PositiveFactor]] = Field(
        16, description="Bottleneck width = max(1, int(d // reduction_factor)); or {layer: factor, default: factor}.")
    bottleneck_size: Union[Width, dict[Union[int, str], Width], None] = Field(
        None, description="An explicit bottleneck width (or {layer: width, default: width}); overrides reduction_factor.")
    non_linearity: Literal[ACTIVATION_NAMES] = Field(  # type: ignore[valid-type]
        "relu", description="Activation between down and up projection (transformers' names: swish = silu).")
    init_weights: Literal["bert", "houlsby", "mam", "mam_adapter", "lora", "zeros"] = Field(
        "bert", description="bert: N(0, 0.02); houlsby: truncated N(0, 0.01) in ±0.02; mam/lora: kaiming down, zero "
                            "up (identity at init); zeros: both zero.")
    residual: Union[bool, None] = Field(
        None, description="Add the adapter's input (insertions) or residual (sublayer) to its output; default yes "
                          "except for action parallel.")
    original_ln_before: bool = Field(
        False, description="sublayer: apply the model's add and norm before the adapter, z = norm(h + x).")
    original_ln_after: bool = Field(
        True, description="sublayer: apply the model's add and norm after the adapter, norm(out + x).")
    residual_before_ln: Union[bool, Literal["post_add"]] = Field(
        True, description="sublayer: the adapter's residual is h (true), z (false) or h + x (post_add).")
    adapter_residual_before_ln: bool = Field(
        False, description="Add the residual before (true) or after (false) the adapter's own ln_after.")
    is_parallel: Union[bool, None] = Field(
        None, description="The adapter reads the sub-layer input x and is added to h (ParBn); implied by action "
                          "parallel.")
    scaling: Union[float, Literal["learned", "channel"]] = Field(
        1.0, description="Multiplies the adapter output: a number, a learned scalar, or a learned vector per channel.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter output.")
    stochastic_depth: float = Field(
        0.0, ge=0, lt=1, description="Drop a sample's whole adapter output with this probability in training.")
    ln_before: bool = Field(False, description="A new LayerNorm on the adapter input.")
    ln_after: bool = Field(False, description="A new LayerNorm on the adapter output.")
    use_gating: bool = Field(False, description="Scale the output by mean over tokens of sigmoid(Linear(d, 1)(input)).")
    phm_layer: bool = Field(False, description="Down and up projections as PHM layers (Compacter); see phm_*.")

    @field_validator("reduction_factor", "bottleneck_size")
    @classmethod
    def _layer_keys(cls, value):
        if isinstance(value, dict):
            bad = [k for k in value if not (isinstance(k, int) or k == "default" or str(k).lstrip("-").isdigit())]
            if bad:
                raise ValueError(f"per-layer keys are layer indices or 'default', not {bad}")
        return value


class BottleneckOptions(PHMOptions, _BottleneckFields):
    """Bottleneck adapters with AdapterHub's BnConfig options (same names, meanings, defaults): Houlsby, Pfeiffer,
    parallel, Adapter+, Compacter (PHM projections). Placement is the spec's `match`; `sublayer` gives the model's
    own residual add and norm to the adapter."""

    supported_actions = ("insert_after", "insert_before", "parallel", "sublayer")


class InvertibleOptions(Options):
    """Invertible adapters (MAD-X): a NICE or GLOW coupling block on a value (the embedding output); with
    `inverse_of`, the exact inverse of another rule's block, sharing its weights (before the LM head)."""

    kind: Literal["invertible"] = "invertible"
    supported_actions = ("insert_after", "insert_before")
    block_type: Literal["nice", "glow"] = Field("nice", description="NICE (additive) or GLOW (affine) coupling.")
    reduction_factor: float = Field(2, gt=0, description="Each subnet's hidden width is its input width // this.")
    non_linearity: Literal[ACTIVATION_NAMES] = Field(  # type: ignore[valid-type]
        "relu", description="The subnets' activation (MAD-X uses the adapter's own).")
    init_weights: Literal["bert", "zeros"] = Field(
        "bert", description="bert: N(0, 0.02) as AdapterHub; zeros: subnet outputs zero, the block starts as identity.")
    clamp: float = Field(5.0, gt=0, description="GLOW: the scales lie within exp(±clamp).")
    inverse_of: Union[str, None] = Field(
        None, description="Run the inverse of the block that this adapter's rule of that name built (shared weights).")

    @model_validator(mode="after")
    def _inverse_takes_no_block_options(self):
        if self.inverse_of is not None:
            defaults = InvertibleOptions.model_fields
            given = [k for k in self.model_fields_set - {"kind", "inverse_of"} if getattr(self, k) != defaults[k].default]
            if given:
                raise ValueError(f"inverse_of uses the block of rule {self.inverse_of!r}; {sorted(given)} belong "
                                 f"on that rule")
        return self


class AdaLoRAOptions(Options):
    """AdaLoRA (Zhang et al. 2023): W + B·(A ⊙ E)·alpha/init_r in SVD form, E zero at init, the rank budget moved between sites by `surgery.AdaLoRAAllocator`; PEFT's AdaLoraConfig defaults."""

    kind: Literal["adalora"] = "adalora"
    supported_actions = ("wrap",)
    init_r: int = Field(12, ge=1, description="Initial rank of every site (the triplets the allocator prunes).")
    target_r: int = Field(8, ge=0, description="Average rank per site after the budget schedule.")
    alpha: float = Field(8, description="Scaling numerator (PEFT's lora_alpha; 0 or less: init_r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the op's input (activation path only).")
    tinit: int = Field(0, ge=0, description="Steps at the full budget before pruning starts.")
    tfinal: int = Field(0, ge=0, description="Final steps with the allocation fixed.")
    deltaT: int = Field(1, ge=1, description="Reallocate every deltaT steps.")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA coefficient of the importance.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA coefficient of the importance's uncertainty.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality penalty added to the loss.")
    total_step: int | None = Field(None, ge=1, description="Total training steps (or give it to the allocator).")
    ranknum: float | None = Field(None, gt=0, description="Rank the scaling divides by (default init_r; a pruned "
                                                          "PEFT checkpoint keeps its initial rank here).")


class PrefixOptions(Options):
    kind: Literal["prefix"] = "prefix"
    supported_actions = ("attend",)
    prefix_length: int = 30
    flat: bool = False
    bottleneck_size: int = 512
    non_linearity: Literal["tanh", "relu", "gelu"] = "tanh"
    dropout: float = 0.0
    use_gating: bool = False


class AdaptionPromptOptions(Options):
    kind: Literal["adaption_prompt"] = "adaption_prompt"
    supported_actions = ("attend",)
    adapter_len: int = 10


class PromptOptions(Options):
    kind: Literal["prompt"] = "prompt"
    supported_actions = ("prepend",)
    prompt_length: int = 10
    init: Literal["random_uniform", "normal"] | dict = "random_uniform"
    random_uniform_scale: float = 0.5


class DoRAOptions(Options):
    kind: Literal["dora"] = "dora"
    supported_actions = ("wrap",)
    r: int = Field(8, ge=1, description="Rank of the direction update B·A.")
    alpha: float = Field(8, gt=0, description="Scaling numerator: s = alpha/r (alpha/sqrt(r) with use_rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the op's input (activation path only).")
    use_rslora: bool = Field(False, description="Rank-stabilized scaling alpha/sqrt(r).")
    init: Literal["kaiming", "gaussian"] = Field(
        "kaiming", description="A's init (B is always zero): kaiming-uniform(a=√5) or Gaussian with std 1/r.")


class IA3Options(Options):
    kind: Literal["ia3"] = "ia3"
    supported_actions = ("wrap",)
    scale: Literal["output", "input", "auto"] = Field(
        "auto", description="Which side the vector scales; auto: the input for ffn.out, the output otherwise.")


class KronAOptions(Options):
    kind: Literal["krona"] = "krona"
    supported_actions = ("wrap",)
    a_out: int | None = Field(None, ge=1, description="Rows of A; must divide the op's output size. Default: "
                                                      "the divisor nearest √out from below.")
    a_in: int | None = Field(None, ge=1, description="Columns of A; must divide the op's input size. Default: "
                                                     "the divisor nearest √in from below.")
    scale: float = Field(1.0, description="s in W + s·(A ⊗ B).")


class LoHaOptions(Options):
    """LoHa (Hyeon-Woo et al. 2022, FedPara): W + (W1a·W1b) ⊙ (W2a·W2b)·alpha/r, W2b zero at init; PEFT's LoHaConfig defaults."""

    kind: Literal["loha"] = "loha"
    supported_actions = ("wrap",)
    r: int = Field(8, ge=1, description="Rank of each of the two factors.")
    alpha: float = Field(8, gt=0, description="Scaling numerator: s = alpha/r.")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Training only: drop output rows of the delta.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Training only: skip the adapter with this "
                                                               "probability.")


class OFTOptions(Options):
    """OFT (Qiu et al. 2023): W·Rᵀ (the input rotated by R), R block-diagonal with Cayley-transformed skew-symmetric blocks, the identity at init; PEFT's OFTConfig defaults (5-term Neumann series)."""

    kind: Literal["oft"] = "oft"
    supported_actions = ("wrap",)
    r: int = Field(0, ge=0, description="Number of diagonal blocks (0: from block_size). Give r or block_size.")
    block_size: int = Field(32, ge=0, description="Size b of each block (0: from r); r·b = d_in.")
    block_share: bool = Field(False, description="One block shared by all r blocks.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Training only: this fraction of blocks is the "
                                                               "identity (multiplicative dropout).")
    use_cayley_neumann: bool = Field(True, description="PEFT's truncated Neumann series for the Cayley transform "
                                                       "(false: the exact inverse).")
    num_cayley_neumann_terms: int = Field(5, ge=1, description="Terms of the Neumann series.")


class BOFTOptions(Options):
    """BOFT (Liu et al. 2024): (W·Mᵀ) ⊙ s, M a product of butterfly factors P·D·Pᵀ with exact Cayley blocks, s a trained output scale, the identity at init; PEFT's BOFTConfig defaults."""

    kind: Literal["boft"] = "boft"
    supported_actions = ("wrap",)
    block_size: int = Field(4, ge=0, description="Size H of each block (0: from block_num). Give one of the two.")
    block_num: int = Field(0, ge=0, description="Number D of blocks per factor (0: from block_size); D·H = d_in.")
    n_butterfly_factor: int = Field(1, ge=1, description="Number m of butterfly factors (1: block-diagonal OFT).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Training only: multiplicative dropout of blocks.")


class ReftOptions(Options):
    kind: Literal["reft"] = "reft"
    supported_actions = ("insert_after",)
    r: int = 1
    prefix_positions: int = 3
    suffix_positions: int = 0
    orthogonal: bool = True
    subtract_projection: bool = True
    tied_weights: bool = False
    dropout: float = 0.05
    non_linearity: Union[Literal["identity", "tanh", "relu", "gelu"], None] = None


class SAIDOptions(Options):
    kind: Literal["said"] = "said"
    supported_actions = ("wrap",)
    d: int = Field(1000, ge=1, description="Dimension of the shared subspace.")
    seed: int = Field(0, description="Seed of the random projections (regenerated, never saved).")


class SparseOptions(Options):
    kind: Literal["sparse"] = "sparse"
    supported_actions = ("wrap",)
    k: int | None = Field(None, ge=1, description="Entries per weight that train (or give `density`).")
    density: float | None = Field(None, gt=0, le=1, description="Fraction of each weight's entries that train.")
    select: Literal["magnitude", "random", "gradient"] = "magnitude"
    seed: int = 0

    @model_validator(mode="after")
    def _one_size(self):
        if (self.k is None) == (self.density is None):
            raise ValueError("give exactly one of `k` (entries per weight) or `density` (a fraction)")
        return self


class VeRAOptions(Options):
    """VeRA (Kopiczko et al. 2024): W + Λ_b·B·Λ_d·A with A, B frozen random matrices shared by the rule's sites (saved once) and only the vectors λ_d (r, init 0.1) and λ_b (d_out, init 0) trained; PEFT's VeraConfig defaults."""

    kind: Literal["vera"] = "vera"
    supported_actions = ("wrap",)
    r: int = Field(256, ge=1, description="Rank of the shared random matrices A (r, d_in) and B (d_out, r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the op's input before A (activation path only).")
    d_initial: float = Field(0.1, description="Initial value of every element of λ_d (λ_b starts at zero).")
    projection_prng_key: int = Field(0, description="Seed of the CPU generator that draws A then B.")
    save_projection: bool = Field(True, description="Save A and B in the checkpoint (else drawn again from the "
                                                    "key at load).")


BUILTIN: dict[str, type[Options]] = {cls.model_fields["kind"].default: cls for cls in (
    BottleneckOptions, LoRAOptions, DoRAOptions, IA3Options, KronAOptions, LoHaOptions, OFTOptions, BOFTOptions,
    AdaLoRAOptions, VeRAOptions, SAIDOptions, SparseOptions, InvertibleOptions, ReftOptions, PrefixOptions,
    AdaptionPromptOptions, PromptOptions)}
