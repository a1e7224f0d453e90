"""Small models shared by the tests (imported by test modules; pytest puts tests/ on sys.path)."""
import torch


def small_vit(seed=0, **kwargs):
    """A 3-block ViT shaped like the bundled teacher (28 px, patch 4, 50 tokens), for quick checks."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=3,
                num_heads=3, mlp_ratio=2.0)
    args.update(kwargs)
    return VisionTransformer(**args).eval()
