"""Evaluation outputs of generated views.

- `gld.eval.metrics`: PSNR, SSIM, LPIPS (offline-aware), depth errors with scale alignment, the
  scene's mean-image baseline.
- `gld.eval.images`: uint8 images, colour-mapped depth, grids, atomic PNG / raw-depth files.
- `gld.eval.ply`: depth maps to coloured world points, PLY write / read.
- `gld.eval.report`: the run folder's report (metrics.json, grid.png, summary.md).

Nothing is imported here, so `gld.eval.images` and `gld.eval.ply` stay usable without torch.
"""
