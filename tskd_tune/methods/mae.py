"""MAE pretraining (He et al., arXiv 2111.06377), the paper's self-supervised baseline for a ViT student:
its encoder learns to reconstruct masked patches of the transfer set (every training image, labelled ones
included, and the synthetic ones; no label and no teacher is read), then the whole student is fine-tuned
on the labels.

Each pretraining step masks ``distill.mask_ratio`` of every image's patches (drawn per image from the
loop's generator, so a resumed run masks exactly as an uninterrupted one), runs the student's ViT blocks on
the visible patch tokens only, and a light decoder (timm ``Block``s at a small width, with mask tokens and
a fixed sin-cos position embedding) predicts the per-patch normalised pixels; the loss is their MSE on the
masked patches. The decoder is dropped afterwards: only the student is fine-tuned and saved.
"""

from __future__ import annotations

import torch
from torch import nn

from tskd_tune.errors import TskdError
from tskd_tune.methods import common
from tskd_tune.methods.context import Outcome, TrialContext
from tskd_tune.methods.registry import MethodSpec, register_method
from tskd_tune.models.vit import Segmenter
from tskd_tune.train import Report, run_loop, seeded
from tskd_tune.transfer import TransferSet, build_transfer_set

DECODER_DEPTH = 2
"""Decoder blocks: MAE's ablation finds a shallow decoder enough for fine-tuning (its default is 8 for ViT-L)."""
HEAD_DIM = 32
"""Width of one decoder attention head; the decoder is about half the encoder's width, in whole heads (one at
least)."""


def visible_count(n_patches: int, ratio: float) -> int:
    """Patches the encoder sees: ``round((1 - ratio) * n_patches)``, at least one and at least one masked."""
    return min(n_patches - 1, max(1, round((1 - ratio) * n_patches)))


def random_masking(batch: int, n_patches: int, ratio: float, g: torch.Generator) -> torch.Tensor:
    """Indices (batch, visible) of the visible patches of each image, sorted; a random subset per image."""
    noise = torch.rand(batch, n_patches, generator=g)
    return noise.argsort(dim=1)[:, : visible_count(n_patches, ratio)].sort(dim=1).values


def patch_pixels(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h * w, patch * patch * C): each patch's pixels, patches in the order the patch
    embedding flattens its grid (row by row); pixels past the last whole patch are not seen by it either."""
    b, c, height, width = images.shape
    h, w = height // patch, width // patch
    x = images[..., : h * patch, : w * patch].reshape(b, c, h, patch, w, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, patch * patch * c)


def encode_visible(net: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A timm ViT on the visible patches only: the tokens of patches ``keep`` (B, k) with their position
    embeddings, the prefix tokens (cls) in front, through every block and the final norm; the k patch tokens."""
    tokens = net._pos_embed(net.patch_embed(x))  # (B, prefix + n_patches, D), position embeddings added
    p = net.num_prefix_tokens
    visible = torch.gather(tokens[:, p:], 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
    out = net.blocks(net.norm_pre(torch.cat([tokens[:, :p], visible], dim=1)))
    return net.norm(out)[:, p:]


class MaeDecoder(nn.Module):
    """The light MAE decoder: visible tokens projected to its width, mask tokens at the masked positions, a
    fixed 2D sin-cos position embedding, ``depth`` transformer blocks, per-patch pixel predictions."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], patch_values: int, depth: int = DECODER_DEPTH):
        super().__init__()
        from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
        from timm.models.vision_transformer import Block

        width = HEAD_DIM * max(1, embed_dim // (2 * HEAD_DIM))
        self.embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token, std=0.02)
        # fixed, as in MAE: a learned one would have to be learned from a few hundred images
        pos = build_sincos2d_pos_embed(list(grid), width)[None]
        self.register_buffer("pos", pos, persistent=False)
        self.blocks = nn.Sequential(*(Block(width, width // HEAD_DIM, qkv_bias=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, patch_values)

    def forward(self, visible: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Predicted pixels (B, n_patches, patch_values) of every patch from the visible tokens (B, k, D)."""
        b, n, width = keep.shape[0], self.pos.shape[1], self.pos.shape[2]
        x = self.mask_token.expand(b, n, width).scatter(
            1, keep[..., None].expand(-1, -1, width), self.embed(visible)
        )
        return self.pred(self.norm(self.blocks(x + self.pos)))


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """MSE on the masked patches against each patch's pixels normalised by its own mean and variance
    (MAE's norm_pix_loss: predicting local contrast, not brightness, gives better representations)."""
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    masked = torch.ones(target.shape[:2], dtype=torch.bool, device=target.device).scatter(1, keep, False)
    return (pred.float() - target).pow(2).mean(dim=-1)[masked].mean()


def vit_of(student: nn.Module) -> nn.Module:
    """The timm ViT inside a ViT student (config validation lets only ``vit_tiny`` reach here)."""
    net = getattr(getattr(student, "encoder", None), "net", None)
    if not isinstance(student, Segmenter) or not all(
        hasattr(net, a) for a in ("patch_embed", "blocks", "_pos_embed")
    ):
        raise TskdError(
            f"distill.method: mae pretrains a ViT student's encoder, got a {type(student).__name__}"
        )
    return net


def decoder_for(st: TrialContext, student: Segmenter) -> MaeDecoder:
    """The decoder that fits ``student``'s ViT (its width, patch grid and pixels per patch), seeded."""
    net = vit_of(student)
    patch = net.patch_embed.patch_size[0]
    with seeded(st.cfg.seed + 1):
        decoder = MaeDecoder(
            net.embed_dim, tuple(net.patch_embed.grid_size), patch * patch * net.patch_embed.proj.in_channels
        )
    return decoder.to(st.device)


def mae_loss(
    student: Segmenter, decoder: MaeDecoder, images: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """The reconstruction loss of one batch of images in [0, 1] with visible patches ``keep``; the target is
    the image as the encoder takes it (its channels, size and normalisation)."""
    net = vit_of(student)
    x = student.encoder.prepare(images)
    pred = decoder(encode_visible(net, x, keep), keep)
    return reconstruction_loss(pred, patch_pixels(x, net.patch_embed.patch_size[0]), keep)


def pretrain(st: TrialContext, student: Segmenter, transfer: TransferSet, steps: int) -> dict:
    """``distill.pretrain_epochs`` of masked-image modelling on the transfer set, checkpointed as ``pretrain``
    with the decoder (resumable), not reported; the decoder is dropped afterwards. The last epoch's metrics."""
    cfg, device = st.cfg, st.device
    decoder = decoder_for(st, student)
    n_patches, bs = decoder.pos.shape[1], cfg.student.batch_size
    positions = common.transfer_positions(st, transfer)

    def step(g):
        # images need no augmentation here: the random mask is MAE's augmentation
        ti = positions[torch.randint(len(positions), (bs,), generator=g).numpy()]
        keep = random_masking(bs, n_patches, cfg.distill.mask_ratio, g)
        return mae_loss(student, decoder, transfer.read(st.prepared.images, ti).to(device), keep.to(device))

    modules = {"student": student, "decoder": decoder}
    loop = common.student_loop(st, "pretrain", modules, step, cfg.distill.pretrain_epochs, steps)
    return run_loop(loop, st.out_dir, None, st.resume)


def mae(st: TrialContext, report: Report | None) -> Outcome:
    """MAE pretraining of the ViT student's encoder on the transfer set, then fine-tuning on the labels."""
    transfer = build_transfer_set(st.splits, st.pool, st.cfg)
    st.record.count_transfer(transfer)
    student = common.student(st)
    steps = st.steps_per_epoch(transfer)
    with st.timed("student"):
        if st.resume is None or st.resume.get("phase") == "pretrain":
            # pretraining epochs are not reported: the scheduler compares trials on the fine-tuning epochs
            pretrain(st, student, transfer, steps)
        metrics = common.fine_tune(st, student, steps, report)
    return Outcome(student, metrics, record=st.record)


SPEC = register_method(MethodSpec("mae", mae, teacher=None, transfer=True, student=True))
