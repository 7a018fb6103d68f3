"""Models: the ViT teacher (timm / LiteMedSAM + LoRA + decoder) and the student registry."""
