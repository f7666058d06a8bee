"""Evaluation metrics (DINO, CLIP-I, CLIP-T, FID, LPIPS, SSIM, PSNR), batched on CPU or GPU."""
