"""Class-conditional UNet generators on digits, LoRA adapters and LoRA soups.

Every generator is called as ``model(x, t, labels)`` and carries ``null_label``: the
extra class index (= ``num_classes``) that stands for "no label". Training with label
dropout (``drop_labels``) teaches the unconditional branch that classifier-free
guidance needs.
"""

import torch
from diffusers import UNet2DModel
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor, nn

# Attention projections, ResNet convolutions and their timestep projections in UNet2DModel.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")


class ClassConditionalUNet(nn.Module):
    """``UNet2DModel`` with a class embedding of ``num_classes + 1`` rows (the last = null label).

    The output is ε̂ for a DDPM model or the velocity v̂ for a flow model: the
    architecture is the same, only the training loss differs.
    """

    def __init__(
        self,
        num_classes: int = 10,
        sample_size: int = 8,
        channels: int = 1,
        block_out_channels: tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.null_label = num_classes
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) * (len(block_out_channels) - 1) + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (len(block_out_channels) - 1),
            norm_num_groups=8,
            attention_head_dim=16,
            num_class_embeds=num_classes + 1,
        )

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """x: (B, C, H, W); t: (B,) timesteps on the scheduler's scale; labels: (B,) in [0, num_classes]."""
        return self.unet(x, t, class_labels=labels, return_dict=False)[0]


def drop_labels(labels: Tensor, p: float, null_label: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by ``null_label`` with probability p (label dropout for CFG training)."""
    device = generator.device if generator is not None else labels.device
    drop = torch.rand(labels.shape, generator=generator, device=device).to(labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def add_lora(
    model: nn.Module,
    rank: int = 4,
    alpha: float = 4.0,
    target_modules: tuple[str, ...] = LORA_TARGETS,
    init_lora_weights: bool | str = "gaussian",
) -> PeftModel:
    """Freeze ``model`` and wrap it with peft LoRA adapters W + (α/r)·B·A on ``target_modules``.

    B starts at 0 (peft init), so the wrapped model equals ``model`` until trained; only
    the ``lora_A``/``lora_B`` tensors are trainable. ``model`` is modified in place.
    """
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=init_lora_weights
    )
    return get_peft_model(model, config)


def lora_state(model: PeftModel) -> dict[str, Tensor]:
    """A detached copy of the adapter tensors (peft state-dict keys)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_soup(model: PeftModel, pretrained: dict[str, Tensor], finetuned: dict[str, Tensor], coef: float) -> None:
    """Load θ = (1 − coef)·θ_pretrained + coef·θ_finetuned into every adapter tensor.

    AlignProp's model mixing ("soup"): tensor-wise interpolation of LoRA weights, so
    coef = 0 gives the pretrained and coef = 1 the fine-tuned model. ``pretrained`` is
    the adapter state before fine-tuning (B = 0: the base model) or another fine-tuned
    adapter.
    """
    mixed = {k: (1.0 - coef) * pretrained[k] + coef * finetuned[k] for k in finetuned}
    result = set_peft_model_state_dict(model, mixed)
    if result.unexpected_keys:
        raise KeyError(f"unexpected LoRA keys: {result.unexpected_keys}")
