"""Small models shared by the tests (imported by test modules; pytest puts tests/ on sys.path)."""
import torch


def randomize_affine(model, seed=0, bias_std=0.1, norm_std=0.2):
    """Random biases and LayerNorm gains/shifts (timm's init leaves zeros and an identity), so that a
    bug in how a bias or a LayerNorm is carried (scaled, folded, dropped) changes the outputs."""
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.elementwise_affine:
                module.weight.copy_(1 + norm_std * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(norm_std / 2 * torch.randn(module.bias.shape, generator=g))
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.bias is not None:
                module.bias.copy_(bias_std * torch.randn(module.bias.shape, generator=g))
    return model


def small_vit(seed=0, **kwargs):
    """A 3-block ViT shaped like the bundled teacher (28 px, patch 4, 50 tokens), for quick checks,
    with random biases and LayerNorm parameters (``randomize_affine``)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=3,
                num_heads=3, mlp_ratio=2.0)
    args.update(kwargs)
    return randomize_affine(VisionTransformer(**args), seed).eval()
