"""Reading published checkpoint files into the project's modules (the modules know no files).

loading.py: `read_state_dict` (safetensors, or torch.load(weights_only=True): no pickled code
runs), `load_into` (by key name, a `LoadReport` naming missing / unexpected keys) and
`CheckpointError` (names the file and the problem); da3.py: the official Depth Anything 3
releases (`load_da3`, `read_da3`, key mapping); gld_release.py: the GLD authors' files: the
fine-tuned DA3 head, dpt_decoder.pt (`load_gld_dpt_decoder`), and the DiT-DH checkpoint with its
config YAML (`load_release_dit`).
"""
