"""Key mappings for published files: `da3` (Depth Anything 3 releases), `gld_release` (the GLD
authors' DA3 head fine-tune, dpt_decoder.pt). Untrusted files load with safetensors or
torch.load(weights_only=True)."""
